"""The "Seeking Neural Nuggets" baseline (Zhong et al., ICLR 2024): knowledge extracted from the
source's weights by sensitivity, injected as the initial value of a LoRA on the target, which is
then trained as usual (post-alignment, laten_ray/lora.py).

1. Sensitivity of each weight matrix W (q, k, v, o, gate, up, down of every source layer):
   S = sum over the seed examples of |W * dL/dW|, L the example's LM loss on its answer tokens
   (mean over them, as the released code's HF loss).
2. Layer selection: the L_t source layers with the largest summed S over their seven matrices,
   in depth order; the i-th kept layer goes to target layer i.
3. Dimension reduction: per matrix, the contiguous window of the target matrix's shape with the
   largest summed S (`best_window`, 2-D prefix sums). Where the source is smaller than the target
   along an axis (the tiny Qwen2 pair's k/v: 32 source rows, 48 target rows), the whole source
   axis is taken and the block sits at offset 0 of a zero matrix of the target's shape.
4. Low rank: the window's SVD, B = U_r diag(s_r) [h, r], A = V_r^T [r, w].
5. `init_lora`: lora_A = A, lora_B = B / scaling, and B A subtracted from the target's base weight,
   so the starting model is the target itself (the released code folds a "delta" LoRA, -B A,
   into the target for the same effect: get_delta.py, train.sh's --delta_path, merge.sh).

Memory (`sensitivity`): a weight's gradient is folded into its float32 accumulator by a
post-accumulate-grad hook and dropped at once, so one matrix's gradient exists at a time;
everything but the seven matrices is frozen. `extract` runs two passes by default, the lower peak:
pass 1 keeps only per-matrix totals ([L_s, 7], no accumulators); pass 2 backpropagates into the
chosen layers only and keeps full accumulators for those L_t layers. Peak: the weights, plus
L_t/L_s of the seven matrices in float32, plus activations (which gradient checkpointing cuts to
a layer's). `passes=1` saves the second pass at the cost of accumulators for all L_s layers.

Differences from the released code (maszhongming/ParaKnowTransfer): layer totals count the seven
matrices only (the released code also counts the layer norms); no LoRA on embed_tokens / lm_head
(its include_emb); the project's prompt format (laten_ray/data.py); a source smaller than the
target along an axis is zero-padded (the released code refuses it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .arch import Arch, shape_of
from .data import Example, lm_batch
from .train import answer_loss

MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


def check_unfused(arch: Arch) -> None:
    """Seeking scores and edits whole weights: a fused one (Phi-3's qkv_proj, gate_up_proj)
    would need its gradients and LoRA split by rows, which it does not do."""
    if arch.family.fused:
        raise ValueError(f"the seeking baseline does not support the {arch.family.name} family: its "
                         f"{', '.join(sorted(arch.family.fused))} projections are row ranges of fused weights")


# --- 1. sensitivity -----------------------------------------------------------------------------
def _check_no_dropout(model) -> None:
    """Gradient checkpointing needs training mode, where dropout would make S random."""
    rates = [getattr(model.config, "attention_dropout", 0.0) or 0.0]
    for m in model.modules():  # an attention module keeps its own copy of the config's rate
        rate = m.p if isinstance(m, torch.nn.Dropout) else getattr(m, "attention_dropout", 0.0)
        if isinstance(rate, (int, float)):
            rates.append(rate)
    p = max(rates)
    if p > 0:
        raise ValueError(f"gradient checkpointing runs the model in training mode, where its dropout "
                         f"(p={p}) would make the sensitivity random; set attention_dropout to 0")


def sensitivity(model, tokenizer, examples: list[Example], max_length: int = 1024,
                layers: list[int] | None = None, full: bool = True, gradient_checkpointing: bool = False
                ) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """S = sum over examples of |W * dL/dW| for the seven matrices of `layers` (default: all),
    one forward and backward per example.

    Returns (totals, accumulators): totals [L, 7] float64 on the CPU, each matrix's summed S
    (columns in MATRICES order; zero for layers not scored); with `full`, accumulators maps
    (layer, module) to that matrix's S [R, C] in float32 on the weight's device, else it is empty.
    The model's requires_grad flags, mode and checkpointing setting are restored afterwards."""
    arch = Arch(model)
    check_unfused(arch)
    layers = list(range(arch.shape.n_layers)) if layers is None else list(layers)
    weights = {(i, m): arch.weight(i, m) for i in layers for m in MATRICES}
    device = next(iter(weights.values())).device
    totals = torch.zeros(arch.shape.n_layers, len(MATRICES), dtype=torch.float64, device=device)  # [L, 7]
    acc = {key: torch.zeros(w.shape, dtype=torch.float32, device=w.device)
           for key, w in weights.items()} if full else {}

    def hook_for(i: int, m: str):
        j = MATRICES.index(m)

        def hook(w: torch.Tensor) -> None:
            s = (w.detach().float() * w.grad.float()).abs_()  # [R, C]; a new tensor, also for fp32
            totals[i, j] += s.sum(dtype=torch.float64)
            if full:
                acc[(i, m)] += s
            w.grad = None  # folded in: free it before the next matrix's gradient arrives
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training, was_checkpointing = model.training, model.is_gradient_checkpointing
    handles = []
    try:
        model.requires_grad_(False)  # embeddings, norms and lm_head need no gradient
        for (i, m), w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook_for(i, m)))
        if gradient_checkpointing:
            _check_no_dropout(model)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # HF checkpoints only in training mode; dropout is 0 (checked)
        else:
            model.eval()
        for example in examples:
            batch = lm_batch(tokenizer, [example], max_length)
            n_tokens = int((batch["labels"][:, 1:] != -100).sum())
            answer_loss(arch, batch, n_tokens).backward()  # mean over the example's answer tokens
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if gradient_checkpointing and not was_checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return totals.cpu(), acc


# --- 2. layer selection -------------------------------------------------------------------------
def select_layers(layer_totals: torch.Tensor, n: int) -> list[int]:
    """The n layers with the largest totals [L] (ties: the shallower first), in depth order."""
    order = sorted(range(len(layer_totals)), key=lambda i: (-float(layer_totals[i]), i))
    return sorted(order[:n])


# --- 3. dimension reduction ---------------------------------------------------------------------
def best_window(S: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    """(row0, col0) of the h x w window of S [R, C] with the largest sum; on ties the first in
    row-major order. h and w are capped at R and C (a source smaller than the target: the whole
    axis, offset 0). O(RC) with 2-D prefix sums in float64."""
    R, C = S.shape
    h, w = min(h, R), min(w, C)
    P = torch.zeros(R + 1, C + 1, dtype=torch.float64, device=S.device)  # [R+1, C+1]
    P[1:, 1:] = S
    P.cumsum_(0).cumsum_(1)  # P[i, j] = S[:i, :j].sum(); in place: two [R, C] float64 at most
    sums = P[h:, w:] - P[:-h, w:]  # [R-h+1, C-w+1]: the window whose top-left corner is there
    sums -= P[h:, :-w]
    sums += P[:-h, :-w]
    k = int(sums.flatten().argmax())  # argmax returns the first maximum
    return divmod(k, sums.shape[1])


# --- 4. low rank --------------------------------------------------------------------------------
@dataclass
class Piece:
    """What one target matrix gets: where it came from, and its rank-r factors."""
    layer: int                      # target layer
    module: str
    source_layer: int
    row0: int                       # the window's top-left corner in the source matrix
    col0: int
    source_shape: tuple[int, int]   # [R, C]
    target_shape: tuple[int, int]   # [h, w]
    block: tuple[int, int]          # the window's size: target_shape capped at source_shape
    rank: int                       # min(rank asked, block's dimensions)
    energy: float                   # share of the block's squared singular values kept
    captured: float                 # share of the source matrix's sensitivity inside the window
    B: torch.Tensor = field(repr=False)  # [h, rank] float32, CPU; zero rows below block[0]
    A: torch.Tensor = field(repr=False)  # [rank, w] float32, CPU; zero columns right of block[1]

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if k not in ("B", "A")}


def reduce(W: torch.Tensor, S: torch.Tensor, target_shape: tuple[int, int], rank: int) -> dict:
    """Steps 3 and 4 for one matrix W [R, C] with sensitivity S [R, C]: the Piece's fields but
    the layers and module."""
    h, w = target_shape
    row0, col0 = best_window(S, h, w)
    bh, bw = min(h, W.shape[0]), min(w, W.shape[1])
    block = W[row0:row0 + bh, col0:col0 + bw].detach().float()  # [bh, bw]
    U, s, Vh = torch.linalg.svd(block, full_matrices=False)      # [bh, k], [k], [k, bw]
    r = min(rank, s.numel())
    B = torch.zeros(h, r)  # [h, r]: the block at offset 0, zeros where the source is smaller
    A = torch.zeros(r, w)  # [r, w]
    B[:bh] = (U[:, :r] * s[:r]).cpu()
    A[:, :bw] = Vh[:r].cpu()
    e2 = s.double().square()
    total = float(S.sum(dtype=torch.float64))
    return dict(row0=row0, col0=col0, source_shape=tuple(W.shape), target_shape=(h, w), block=(bh, bw),
                rank=r, energy=float(e2[:r].sum() / e2.sum()) if e2.sum() > 0 else 1.0,
                captured=float(S[row0:row0 + bh, col0:col0 + bw].sum(dtype=torch.float64)) / total
                if total > 0 else 0.0,
                B=B, A=A)


# --- the plan -----------------------------------------------------------------------------------
@dataclass
class Plan:
    """What `extract` found; `to_json()` is plain data (no tensors) for reports and plots."""
    rank: int
    n_examples: int
    layer_totals: list[float]              # [L_s]: summed S of each source layer's seven matrices
    module_totals: dict[str, list[float]]  # module -> [L_s]
    chosen: list[int]                      # [L_t]: source layers in depth order; i-th -> target layer i
    pieces: list[Piece]                    # one per (target layer, module)
    passes: int = 2
    seconds: dict[str, float] = field(default_factory=dict)

    def piece(self, layer: int, module: str) -> Piece:
        return next(p for p in self.pieces if (p.layer, p.module) == (layer, module))

    def to_json(self) -> dict:
        return {"rank": self.rank, "n_examples": self.n_examples, "layer_totals": self.layer_totals,
                "module_totals": self.module_totals, "chosen": self.chosen, "passes": self.passes,
                "seconds": self.seconds, "pieces": [p.to_json() for p in self.pieces]}


def extract(source, tokenizer, target, examples: list[Example], rank: int = 16, max_length: int = 1024,
            gradient_checkpointing: bool = False, passes: int = 2) -> Plan:
    """Steps 1-4: sensitivity of `source` on `examples` (tokenized with the source's `tokenizer`),
    layer selection, windows and SVDs. `target` is the target model or its HF config (only its
    shapes are read). Two passes by default (module docstring: the lower memory)."""
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2, not {passes}")
    arch = Arch(source)
    t_shape = shape_of(getattr(target, "config", target))
    n_source, n_target = arch.shape.n_layers, t_shape.n_layers
    if n_target > n_source:
        raise ValueError(f"the target has more layers ({n_target}) than the source ({n_source})")
    seconds = {}
    t0 = time.perf_counter()
    totals, acc = sensitivity(source, tokenizer, examples, max_length, full=passes == 1,
                              gradient_checkpointing=gradient_checkpointing)  # [L_s, 7]
    seconds["pass1"] = time.perf_counter() - t0
    chosen = select_layers(totals.sum(1), n_target)
    if passes == 2:
        t0 = time.perf_counter()
        _, acc = sensitivity(source, tokenizer, examples, max_length, layers=chosen, full=True,
                             gradient_checkpointing=gradient_checkpointing)
        seconds["pass2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pieces = []
    for t, i in enumerate(chosen):
        for m in MATRICES:
            S = acc.pop((i, m))  # freed once reduced
            pieces.append(Piece(layer=t, module=m, source_layer=i,
                                **reduce(arch.weight(i, m), S, t_shape.matrix(m), rank)))
            del S
    acc.clear()
    seconds["reduce"] = time.perf_counter() - t0
    return Plan(rank=rank, n_examples=len(examples), layer_totals=totals.sum(1).tolist(),
                module_totals={m: totals[:, j].tolist() for j, m in enumerate(MATRICES)},
                chosen=chosen, pieces=pieces, passes=passes, seconds=seconds)


# --- 5. LoRA initialisation ---------------------------------------------------------------------
@torch.no_grad()
def init_lora(peft_model, plan: Plan, adapter: str = "default") -> list[tuple[int, str]]:
    """Start `peft_model`'s LoRA (peft.get_peft_model on the target, lora_dropout 0) at the plan:
    lora_A = A, lora_B = B / scaling, and the product the LoRA adds (scaling * lora_B @ lora_A, as
    stored) subtracted from the base weight in float32, so the model still computes the target
    (exactly up to float32 rounding; a bf16 base also rounds W - B A to bf16, as the released
    code's fp16 merge of its delta LoRA did).
    Rank rows beyond a piece's rank keep peft's init (A random, B zero: trainable, adding nothing).
    Modules without a piece keep peft's init; pieces whose module has no LoRA are skipped.
    Returns the (target layer, module) pairs initialised."""
    from peft.tuners.lora import LoraLayer

    arch = Arch(peft_model.get_base_model())  # peft replaced the linear layers in place
    done = []
    for p in plan.pieces:
        layer = arch.part(p.layer, p.module)
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # [r, in], [out, r]
        if p.rank > lora_A.shape[0]:
            raise ValueError(f"plan rank {p.rank} exceeds the LoRA rank {lora_A.shape[0]}")
        scaling = layer.scaling[adapter]
        lora_A[:p.rank] = p.A.to(lora_A.device, lora_A.dtype)
        lora_B.zero_()
        lora_B[:, :p.rank] = (p.B / scaling).to(lora_B.device, lora_B.dtype)
        base = layer.get_base_layer().weight  # [out, in]
        delta = scaling * (lora_B.float() @ lora_A.float())  # [out, in]: what the LoRA adds
        base.copy_((base.float() - delta).to(base.dtype))
        done.append((p.layer, p.module))
    return done
