"""Shared by the benchmarks: random models built from configs, process memory readings (Linux)."""
from __future__ import annotations

import os
import resource

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def random_llama(vocab: int, hidden: int, ffn: int, layers: int, heads: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", **config) -> torch.nn.Module:
    """A frozen random multi-head Llama, the same for the same arguments."""
    cfg = AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
        **{"max_position_embeddings": 1024, **config})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB


def reset_peak_rss() -> bool:
    """Reset the high-water mark (and so ru_maxrss) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
