"""Generation throughput of vLLM vs transformers on the same model and the same 64 prompts, side
by side in one run, and the code sandbox's overhead per program.

The model is random with Qwen2.5-0.5B's shape (24 layers, 896 wide, 14 heads / 2 KV heads,
FFN 4864, vocabulary 151936), float32. Prompts are seeded random token ids (32-128 tokens);
each engine greedily generates exactly --max-tokens tokens per prompt (EOS ignored), so both
produce the same number of tokens. Engines take token ids, so no tokenizer is involved.

    python bench/eval_throughput.py [--prompts 64] [--max-tokens 64] [--hf-batch 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=2048,
                tie_word_embeddings=True)


def hf_tokens_per_s(folder: Path, prompts: list[list[int]], max_tokens: int, batch: int) -> tuple[float, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generated, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(prompts), batch):
            chunk = prompts[first:first + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            generated += (out.shape[1] - width) * len(chunk)
    seconds = time.perf_counter() - t0
    return generated / seconds, seconds


def vllm_tokens_per_s(folder: Path, prompts: list[list[int]], max_tokens: int) -> tuple[float, float, float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.perf_counter()
    llm = LLM(model=str(folder), dtype="float32", skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=512, kv_cache_memory_bytes=2 << 30, seed=0)
    start = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0,
                            detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    return generated / seconds, seconds, start


def sandbox_programs_per_s(n: int) -> float:
    from laten_ray.eval.sandbox import Limits, run_programs
    t0 = time.perf_counter()
    outcomes = run_programs(["assert 1 + 1 == 2\n"] * n, Limits(timeout_s=10))
    assert all(o.passed for o in outcomes)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--sandbox-programs", type=int, default=64)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 32000, (int(torch.randint(32, 129, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    folder = Path(tempfile.mkdtemp(prefix="laten-bench-eval-")) / "qwen2-0.5b-random"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **QWEN_05B), dtype=torch.float32)
    model.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    print(f"model: random Qwen2.5-0.5B shape, {n_params / 1e6:.0f}M parameters, float32; {len(prompts)} prompts "
          f"of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.max_tokens} new tokens each; "
          f"{torch.get_num_threads()} torch threads", flush=True)
    hf, hf_s = hf_tokens_per_s(folder, prompts, args.max_tokens, args.hf_batch)
    print(f"transformers (batches of {args.hf_batch}, KV cache): {hf:.1f} tokens/s ({hf_s:.1f} s)", flush=True)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM is not installed: pip install -e '.[cpu]' (or '.[gpu]') to compare")
    else:
        vl, vl_s, start = vllm_tokens_per_s(folder, prompts, args.max_tokens)
        print(f"vLLM (continuous batching): {vl:.1f} tokens/s ({vl_s:.1f} s; engine start {start:.1f} s)")
        print(f"vLLM / transformers: {vl / hf:.2f}x")
    rate = sandbox_programs_per_s(args.sandbox_programs)
    print(f"sandbox: {rate:.1f} trivial programs/s ({1000 / rate:.0f} ms each, {os.cpu_count()} in parallel)")


if __name__ == "__main__":
    main()
