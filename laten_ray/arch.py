"""Architecture as data: where each part of a decoder lives (laten_ray/families.yaml), and its
sizes from the HF config.

A neuron is one row or one column of a projection weight (nn.Linear stores [out, in]):
  up, v  -> a row    (axis 0): an output feature, a vector in the model's input width d
  down, o -> a column (axis 1): an input feature, a vector written into the residual stream
A fused projection (Phi-3's qkv_proj, gate_up_proj) holds several modules as row ranges; the
family's `fused` entry gives each range's offset, and `Arch.weight` is a view of that range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

MODULES = ("up", "down", "v", "o")  # the transferable module types, in a fixed order
NEURON_AXIS = {"up": 0, "down": 1, "v": 0, "o": 1, "gate": 0, "q": 0, "k": 0}
FAMILIES_FILE = Path(__file__).with_name("families.yaml")


@dataclass(frozen=True)
class Family:
    """One entry of families.yaml (the file documents every field)."""
    name: str
    model_types: tuple[str, ...]
    notes: str
    layers: str
    final_norm: str
    lm_head: str
    attn: str
    mlp: str
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str
    fused: dict = field(default_factory=dict)  # module -> Shape fields summed to its first row
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    norm_offset: float = 0.0
    logit_softcap: str | None = None

    @property
    def base(self) -> str:
        """The decoder without lm_head (ending in the final norm): the parent of `layers`."""
        return self.layers.rsplit(".", 1)[0]

    def post_norm(self, module: str) -> str | None:
        """The Family field of the norm between module's output and the residual stream (o,
        down), if the family has one."""
        field = {"o": "attn_post_norm", "down": "mlp_post_norm"}.get(module)
        return field if field and getattr(self, field) else None


def read_families(path: Path = FAMILIES_FILE, tree: dict | None = None) -> dict[str, Family]:
    """families.yaml (already parsed: `tree`) as {name: Family}; an unknown key or a model_type
    claimed twice is an error naming the file and the entry."""
    tree = dict(tree if tree is not None else _parsed(path))
    defaults = tree.pop("defaults")
    tree.pop("unsupported", None)
    known = set(Family.__dataclass_fields__) - {"name"}
    out, owner = {}, {}
    for name, entry in tree.items():
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path}: family {name}: unknown key(s) {', '.join(sorted(unknown))}")
        fields = {**defaults, **entry}
        fields["model_types"] = tuple(fields["model_types"])
        fields["fused"] = {m: tuple(sizes) for m, sizes in fields.get("fused", {}).items()}
        for model_type in fields["model_types"]:
            if model_type in owner:
                raise ValueError(f"{path}: model_type {model_type!r} is in both {owner[model_type]} and {name}")
            owner[model_type] = name
        out[name] = Family(name=name, **fields)
    return out


def _parsed(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())


_TREE = _parsed(FAMILIES_FILE)  # read once: the families, and the hints for refused model types
FAMILIES: dict[str, Family] = read_families(FAMILIES_FILE, _TREE)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}
UNSUPPORTED: dict[str, str] = _TREE.get("unsupported", {})  # model_type -> why, and what to do


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
    logit_softcap: float | None = None  # c of a final-logit soft cap, c tanh(logits / c)

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

    def matrix(self, module: str) -> tuple[int, int]:
        """[out, in] of a module's weight (nn.Linear's layout; a fused module's own rows)."""
        return {"q": (self.attn_width, self.hidden), "k": (self.kv_width, self.hidden),
                "v": (self.kv_width, self.hidden), "o": (self.hidden, self.attn_width),
                "gate": (self.ffn, self.hidden), "up": (self.ffn, self.hidden),
                "down": (self.hidden, self.ffn)}[module]


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in BY_MODEL_TYPE:
        hint = UNSUPPORTED.get(model_type)
        if hint:
            raise ValueError(f"unsupported architecture {model_type!r}: {hint}")
        raise ValueError(f"unsupported architecture {model_type!r}; supported model types: "
                         f"{', '.join(sorted(BY_MODEL_TYPE))} (laten_ray/families.yaml)")
    return BY_MODEL_TYPE[model_type]


def shape_of(config) -> Shape:
    family = family_of(config)  # validates the family first
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return Shape(
        family=family.name,
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        ffn=config.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        logit_softcap=getattr(config, family.logit_softcap, None) if family.logit_softcap else None,
    )


def rows_of(family: Family, shape: Shape, module: str) -> slice:
    """The rows of `module` in the weight its path names: all of them, or a fused range."""
    start = sum(getattr(shape, size) for size in family.fused.get(module, ()))
    return slice(start, start + shape.matrix(module)[0])


def weight_name(family: Family, layer: int, module: str) -> str:
    """The state-dict name of the weight that holds `module` of `layer`."""
    return f"{family.layers}.{layer}.{getattr(family, module)}.weight"


def get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class Arch:
    """A loaded model seen through its family's entry."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model.config)
        self.shape = shape_of(model.config)
        self.layers: nn.ModuleList = get(model, self.family.layers)

    def part(self, layer: int, name: str) -> nn.Module:
        """The module at a Family path of a layer (up, down, v, o, attn_post_norm, ...): for a
        fused module, the fused projection."""
        return get(self.layers[layer], getattr(self.family, name))

    def base(self) -> nn.Module:
        """The decoder without lm_head, ending in the final norm (the model's `model`)."""
        return get(self.model, self.family.base)

    def final_norm(self) -> nn.Module:
        return get(self.model, self.family.final_norm)

    def lm_head(self) -> nn.Linear:
        return get(self.model, self.family.lm_head)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """What an RMSNorm multiplies x / rms(x) by, in float32: weight (+ 1 for Gemma). [d]"""
        return norm.weight.float() + self.family.norm_offset

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head, then the family's final-logit soft cap if it has one, as the model's forward does."""
        out = self.lm_head()(hidden)
        cap = self.shape.logit_softcap
        return out if cap is None else torch.tanh(out / cap) * cap

    def rows(self, module: str) -> slice:
        return rows_of(self.family, self.shape, module)

    def weight(self, layer: int, module: str) -> torch.Tensor:
        """The module's weight [out, in]: for a fused module, a view of its rows, so in-place
        edits (merge) land in the fused weight."""
        w = self.part(layer, module).weight
        return w[self.rows(module)] if module in self.family.fused else w

    def output(self, module: str, out: torch.Tensor) -> torch.Tensor:
        """The module's own features of its part's output [.., n] (a fused part computes more)."""
        return out[..., self.rows(module)] if module in self.family.fused else out

    def out_vectors(self, layer: int, module: str) -> torch.Tensor:
        """The vectors a column module (o, down) writes into the residual stream, float32 [d, n]:
        its weight, through the gain of the post-norm after it if the family has one (that
        norm's RMS statistic is frozen per example: docs/method.md §1)."""
        w = self.weight(layer, module).float()
        post = self.family.post_norm(module)
        return w if post is None else w * self.norm_gain(self.part(layer, post))[:, None]

    def neuron_vectors(self, layer: int, module: str, index: torch.Tensor) -> torch.Tensor:
        """The selected neurons of one layer as row vectors, [K, d]."""
        w = self.weight(layer, module)
        axis = NEURON_AXIS[module]
        picked = w.index_select(axis, index.to(w.device))
        return picked if axis == 0 else picked.T
