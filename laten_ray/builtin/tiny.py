"""Tiny models, offline: random presets (`tiny:llama-source`, ...) built from configs with a
fixed seed into the cache folder on first use, and the demo pair (`tiny:demo-source`,
`tiny:demo-target`) pre-trained on the demo task and shipped in `weights/`, built by
scripts/build_demo_models.py and checked against the sha256 sums below at every load. All share
a byte-level BPE tokenizer trained on the demo corpus, with digits kept as single tokens."""
from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import cache_dir, demo

# name -> (model_type, config fields). Sources are wider and deeper than targets.
TINY = {
    "llama-source": ("llama", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=4)),
    "llama-target": ("llama", dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4)),
    "qwen2-source": ("qwen2", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=16)),
    "qwen2-target": ("qwen2", dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
}
# One pair per further family (families.yaml), small enough for the per-neuron reference: each
# turns on what makes its family differ (tests/test_families.py). Token ids as the tokenizer's.
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SOURCE = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, **_IDS)
_TARGET = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=1, **_IDS)  # head_dim 32 in both: vLLM's CPU attention needs >= 32
_NARROW = (dict(hidden_size=96, head_dim=32), dict(hidden_size=48, head_dim=32))  # head_dim != hidden / heads
_SLIDING = dict(sliding_window=8, query_pre_attn_scalar=32)  # windows shorter than the prompts
_FAMILY_TRAITS = {
    "llama3": ("llama", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), {}, {}),
    "mistral": ("mistral", dict(sliding_window=8), {}, {}),
    "qwen3": ("qwen3", {}, *_NARROW),
    "gemma2": ("gemma2", dict(tie_word_embeddings=True, final_logit_softcapping=0.5, attn_logit_softcapping=2.0,
                              **_SLIDING),
               dict(_NARROW[0], layer_types=["sliding_attention", "full_attention"] * 2),
               dict(_NARROW[1], layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma3": ("gemma3_text", dict(tie_word_embeddings=True, **_SLIDING),
               dict(_NARROW[0], layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention"]),
               dict(_NARROW[1], layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": ("phi3", {}, {}, {}),
    "olmo2": ("olmo2", {}, {}, {}),
    "smollm3": ("smollm3", dict(tie_word_embeddings=True, no_rope_layer_interval=2), {}, {}),
}
for _name, (_type, _both, _src, _tgt) in _FAMILY_TRAITS.items():
    TINY[f"{_name}-source"] = (_type, {**_SOURCE, **_both, **_src})
    TINY[f"{_name}-target"] = (_type, {**_TARGET, **_both, **_tgt})
# The demo pair: the shapes of the Llama presets, pre-trained by scripts/build_demo_models.py
# (the source on the multiplication table, the target on the answer format only: demo.py).
DEMO = {"demo-source": TINY["llama-source"], "demo-target": TINY["llama-target"]}
WEIGHTS = Path(__file__).resolve().parent / "weights"
# What the build script wrote; a shipped file that differs is refused (the script prints these).
DEMO_SHA256 = {
    "demo-source": {
        "config.json": "d6161be31fb91730f39280dd03ff369d4ceb5024c9cc01b2c65cba99ee6b3843",
        "generation_config.json": "6b0e82dfb96a8376c5bffb91c6717f2e357d59bc4ce85a7e3aad4a1f3e9841f4",
        "model.safetensors": "fabd3ea248bccc3573e5b5d9b74609c0a5be73d74eeb1da170f68495cb7555ba",
        "tokenizer.json": "293f06962b5f9dc4fa5918065eed6aa6854ebde14d6fd657fbd0f1dc050b3970",
        "tokenizer_config.json": "35c49649703c869bcc94ce0c259281124b35bba41af40686bf6b97cf898e8e2e",
    },
    "demo-target": {
        "config.json": "5b54524da3e1c0f5aadfb8d2e8a6941c6f48d50ce9b887204a40af1c87018eb7",
        "generation_config.json": "6b0e82dfb96a8376c5bffb91c6717f2e357d59bc4ce85a7e3aad4a1f3e9841f4",
        "model.safetensors": "339c371a36431b16f5b831a96aa5defbd840c987d8695bd30d39482d9afb465f",
        "tokenizer.json": "293f06962b5f9dc4fa5918065eed6aa6854ebde14d6fd657fbd0f1dc050b3970",
        "tokenizer_config.json": "35c49649703c869bcc94ce0c259281124b35bba41af40686bf6b97cf898e8e2e",
    },
}
NAMES = (*TINY, *DEMO)
TINY_CACHE = "tiny-2"  # the random presets' cache folder, renamed when their tokenizer changes
TINY_VOCAB = 512  # the tiny tokenizer's size; every tiny model's vocabulary


class WeightsError(ValueError):
    """A shipped demo model file is missing or not the one the build script wrote."""


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the demo corpus (deterministic, offline). Digits are
    single tokens, as in Llama's tokenizer, so a number's digits are predicted one by one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = demo.corpus() + [f"<|{r}|>\n" for r in ("user", "assistant", "system")]
    tok.train_from_iterator(texts, trainer=trainer)
    # the small corpus runs out of merges before TINY_VOCAB: reserved tokens fill the rest, so
    # every id a model can produce decodes (to nothing)
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(TINY_VOCAB - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_config(name: str, vocab_size: int = TINY_VOCAB):
    """The config of a preset: the shipped one for the demo pair, else built from TINY."""
    from transformers import AutoConfig
    if name in DEMO:
        return AutoConfig.from_pretrained(tiny_folder(name))
    return config_of(TINY[name], vocab_size)


def config_of(shape: tuple[str, dict], vocab_size: int = TINY_VOCAB):
    """An HF config from (model_type, config fields)."""
    from transformers import AutoConfig
    model_type, fields = shape
    return AutoConfig.for_model(model_type, **{"vocab_size": vocab_size, "max_position_embeddings": 1024,
                                               "tie_word_embeddings": False, **fields})


def tiny_folder(name: str) -> Path:
    """The folder of preset `name`: the shipped demo folder once its hashes check, else the
    random preset in the cache, built on first use."""
    if name in DEMO:
        return check_weights(WEIGHTS / name, DEMO_SHA256[name])
    return build_tiny(name, cache_dir() / TINY_CACHE)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_weights(folder: Path, expected: dict[str, str]) -> Path:
    """`folder` if each expected file is there with its sha256; WeightsError names the first
    that is not."""
    if not expected:
        raise WeightsError(f"{folder}: no sha256 sums recorded for it (laten_ray/builtin/tiny.py "
                           "DEMO_SHA256); build it with scripts/build_demo_models.py")
    for file, want in expected.items():
        path = folder / file
        if not path.is_file():
            raise WeightsError(f"{path}: missing (a shipped demo model file; reinstall the package "
                               "or rebuild with scripts/build_demo_models.py)")
        got = sha256(path)
        if got != want:
            raise WeightsError(f"{path}: sha256 {got} is not the recorded {want} (the file is changed or "
                               "corrupt; reinstall the package or rebuild with scripts/build_demo_models.py)")
    return folder


def build_tiny(name: str, root: Path, seed: int = 0) -> Path:
    """Build random preset `name` under root (once; concurrent builders are safe) and return its folder."""
    from transformers import AutoModelForCausalLM
    final = root / name
    if is_model_folder(final):
        return final
    print(f"building tiny:{name} into {final}", file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        tokenizer = build_tokenizer()
        assert len(tokenizer) == TINY_VOCAB, len(tokenizer)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(name, TINY_VOCAB))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not is_model_folder(final):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
