"""Tiny models built from configs, offline: random presets (`tiny:llama-source`, ...) and the
demo pair pre-trained on the demo task (`tiny:demo-source`, `tiny:demo-target`). Each is built
once with a fixed seed into the cache folder, with a byte-level BPE tokenizer trained on the
demo corpus."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..data import Example, lm_batch
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
# Demo presets: a tiny preset's shape, pre-trained on demo:train for this many steps, so the
# source knows the demo task better than the target (the situation LaTen is for).
DEMO = {"demo-source": ("llama-source", 300), "demo-target": ("llama-target", 20)}
NAMES = (*TINY, *DEMO)
TINY_VOCAB = 512  # the tiny tokenizer's size; every tiny model's vocabulary


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the demo corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = demo.corpus() + [f"<|{r}|>\n" for r in ("user", "assistant", "system")]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_config(name: str, vocab_size: int = TINY_VOCAB):
    from transformers import AutoConfig
    model_type, fields = TINY[DEMO[name][0] if name in DEMO else name]
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, max_position_embeddings=1024,
                                tie_word_embeddings=False, **fields)


def tiny_folder(name: str) -> Path:
    """The folder of preset `name` in the cache, built on first use."""
    return build_tiny(name, cache_dir() / "tiny")


def build_tiny(name: str, root: Path, seed: int = 0) -> Path:
    """Build preset `name` under root (once; concurrent builders are safe) and return its folder."""
    from transformers import AutoModelForCausalLM
    final = root / name
    if is_model_folder(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        tokenizer = build_tokenizer()
        torch.manual_seed(seed)
        assert len(tokenizer) == TINY_VOCAB, len(tokenizer)
        model = AutoModelForCausalLM.from_config(tiny_config(name, TINY_VOCAB))
        if name in DEMO:
            pretrain(model, tokenizer, DEMO[name][1], seed)
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


def pretrain(model, tokenizer, steps: int, seed: int, batch_size: int = 16, lr: float = 3e-3) -> None:
    """Plain LM training on the demo train split (whole texts), batches drawn with a fixed seed."""
    examples = [Example(tuple(r["messages"])) for r in demo.records("train")]
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        batch = lm_batch(tokenizer, [examples[i] for i in picks], 256, train_on_inputs=True)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
