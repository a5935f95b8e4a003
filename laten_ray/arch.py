"""Architecture as data: where each part of a decoder lives, and its sizes from the HF config.

A neuron is one row or one column of a projection weight (nn.Linear stores [out, in]):
  up, v  -> a row    (axis 0): an output feature, a vector in the model's input width d
  down, o -> a column (axis 1): an input feature, a vector written into the residual stream
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MODULES = ("up", "down", "v", "o")  # the transferable module types, in a fixed order
NEURON_AXIS = {"up": 0, "down": 1, "v": 0, "o": 1, "gate": 0, "q": 0, "k": 0}


@dataclass(frozen=True)
class Family:
    """Dotted paths of a family's parts: `base` (the decoder without lm_head, ending in the final
    norm), `layers`, `final_norm` and `lm_head` are relative to the model, the rest to a layer."""
    base: str = "model"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    up: str = "mlp.up_proj"
    gate: str = "mlp.gate_proj"
    down: str = "mlp.down_proj"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"


_LLAMA_LIKE = Family()
FAMILIES: dict[str, Family] = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE}


@dataclass(frozen=True)
class Shape:
    """The sizes LaTen needs, read from an HF config."""
    family: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float

    @property
    def attn_width(self) -> int:
        """Attention neurons: columns of o_proj."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Rows of v_proj; fewer than attn_width under grouped-query attention."""
        return self.n_kv_heads * self.head_dim

    def neurons(self, module: str) -> int:
        """How many neurons a module type has per layer."""
        return {"up": self.ffn, "down": self.ffn, "o": self.attn_width, "v": self.kv_width}[module]


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def shape_of(config) -> Shape:
    family_of(config)  # validates the family first
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return Shape(
        family=config.model_type,
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        ffn=config.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
    )


def get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class Arch:
    """A loaded model seen through its family table."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model.config)
        self.shape = shape_of(model.config)
        self.layers: nn.ModuleList = get(model, self.family.layers)

    def part(self, layer: int, name: str) -> nn.Module:
        """`name` is a field of Family relative to a layer (up, down, v, o, attn, mlp, ...)."""
        return get(self.layers[layer], getattr(self.family, name))

    def base(self) -> nn.Module:
        return get(self.model, self.family.base)

    def final_norm(self) -> nn.Module:
        return get(self.model, self.family.final_norm)

    def lm_head(self) -> nn.Linear:
        return get(self.model, self.family.lm_head)

    def weight(self, layer: int, module: str) -> torch.Tensor:
        return self.part(layer, module).weight

    def neuron_vectors(self, layer: int, module: str, index: torch.Tensor) -> torch.Tensor:
        """The selected neurons of one layer as row vectors, [K, d]."""
        w = self.weight(layer, module)
        axis = NEURON_AXIS[module]
        picked = w.index_select(axis, index.to(w.device))
        return picked if axis == 0 else picked.T
