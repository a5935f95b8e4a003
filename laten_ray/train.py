"""Train the hypernetwork (docs/method.md §6). The two roles that Ray puts on two GPUs: the
source (`locate.Source`: slices for each extract example) and the target (`TargetTraining`:
the frozen target's selection, the `Trainer` of the hypernetwork, checkpoints). `train` wires
them together in one process.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Collection

import torch
import torch.nn.functional as F
import yaml

from . import checkpoint as ckpt
from .arch import Arch, Shape
from .checks import check_align_per_step
from .config import Config, ConfigError
from .data import Example, lm_batch, read_examples
from .hypernet import HyperNet
from .inject import injected
from .locate import Located, Source, Target


def n_steps(cfg: Config, n_extract: int) -> int:
    return cfg.train.steps if cfg.train.steps is not None else n_extract


def _rise(i: int, warm: int, start: float) -> float:
    """The warm-up of both schedules: a cosine rise from `start` to 1 over `warm` steps."""
    return start + (1 - start) * (1 - math.cos(math.pi * i / warm)) / 2


def one_cycle(total: int, warmup_ratio: float, start: float = 1 / 25, end: float = 1e-4):
    """LR factor for step i: cosine rise from `start` to 1 over the warm-up, cosine fall to `end`."""
    return _one_cycle(total, round(total * warmup_ratio), start, end)


def _one_cycle(total: int, warm: int, start: float = 1 / 25, end: float = 1e-4):
    def factor(i: int) -> float:
        if i < warm:
            return _rise(i, warm, start)
        progress = (i - warm) / max(1, total - warm)
        return end + (1 - end) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    return factor


def warmup_then_constant(warm: int, start: float = 1 / 25):
    """LR factor for step i: one_cycle's cosine rise over `warm` steps, then 1. It does not depend
    on the run's length, so the checkpoint after B steps is exactly a run of B steps."""
    return lambda i: _rise(i, warm, start) if i < warm else 1.0


def lr_schedule(schedule: str, total: int, warmup_ratio: float, warmup_steps: int | None):
    """The LR factor of `train.schedule` for a run of `total` steps."""
    warm = warmup_steps if warmup_steps is not None else round(total * warmup_ratio)
    return warmup_then_constant(warm) if schedule == "constant" else _one_cycle(total, warm)


def align_sample(n_align: int, k: int, seed: int, step: int) -> list[int]:
    """The align examples of a step, from a generator seeded by (seed, step) alone, so a resumed
    run draws exactly what an uninterrupted one does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n_align, generator=g)[:k].tolist()


def answer_loss(arch: Arch, batch: dict, n_tokens: int, base=None) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions, divided by n_tokens (the
    labelled tokens of the whole step, so micro-batching does not change the step). The
    unembedding runs at labelled positions only: [N, V] logits, not [B, T, V].
    `base` replaces the decoder call (e.g. a functional call with other weights)."""
    device = arch.lm_head().weight.device
    hidden = (base or arch.base())(input_ids=batch["input_ids"].to(device), use_cache=False,
                                   attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    labels = batch["labels"][:, 1:].to(device)                 # [B, T-1]: token t+1 is read at t
    keep = labels != -100
    logits = arch.logits(hidden[:, :-1][keep]).float()        # [N, V] (soft-capped where the family caps)
    return F.cross_entropy(logits, labels[keep], reduction="sum") / max(n_tokens, 1)


def hypernet_backward(hypernet: HyperNet, slices: dict, batches: list, micro_step,
                      reg_lambda: float) -> tuple[float, float]:
    """Gradients of LM loss + reg_lambda * mean(delta^2) per module into the hypernetwork.

    The micro-batches see the deltas as leaf tensors and accumulate dLoss/dDelta there
    (`micro_step(leaves, batch)` runs forward and backward, returns the loss). Then the
    hypernetwork runs again one target layer at a time, with grad, and each layer's backward
    carries its share into the hypernetwork: its activations ([K, d_s]-sized per module) never
    exist for all layers at once, nor beside the target's. Returns (lm loss, reg loss)."""
    n_layers = next(iter(slices.values())).shape[0]

    def layer(i: int) -> dict:
        return hypernet({m: s[i:i + 1] for m, s in slices.items()})  # module -> [1, K, d_t]

    with torch.no_grad():
        parts = [layer(i) for i in range(n_layers)]
        leaves = {m: torch.cat([p[m] for p in parts]).requires_grad_() for m in slices}  # [L_t, K, d_t]
        del parts
    lm_loss = 0.0
    for batch in batches:
        lm_loss += micro_step(leaves, batch)
    grads = {m: leaf.grad for m, leaf in leaves.items()}
    sizes = {m: leaf.numel() for m, leaf in leaves.items()}
    del leaves
    reg_total = 0.0
    for i in range(n_layers):
        deltas = layer(i)
        reg = sum(reg_lambda * d.pow(2).sum() / sizes[m] for m, d in deltas.items())  # this layer's share
        through = sum((d * grads[m][i:i + 1]).sum() for m, d in deltas.items())
        (reg + through).backward()
        reg_total += reg.detach()
    return lm_loss, float(reg_total)


def step_examples(cfg: Config, n_extract: int, n_align: int, step: int) -> list[tuple[str, int]]:
    """What step `step` trains on, as (split, index): its extract example, then its align sample.
    The equal-data baseline of a study (`sft-lora`) replays exactly this."""
    picks = align_sample(n_align, cfg.train.align_per_step, cfg.seed, step)
    return [("extract", step % n_extract)] + [("align", i) for i in picks]


def source_group(source: Source, extract: list[Example], i: int, size: int, target: Shape, counts: dict,
                 on_cpu: bool = True) -> dict[int, Located]:
    """The source's selections of extract example i's fixed group (group_of), by extract index:
    what the single-process run and the Ray source actor attribute alike."""
    members = group_of(i, len(extract), size)
    return dict(zip(members, source.locate([extract[j] for j in members], target, counts, on_cpu=on_cpu)))


def group_of(i: int, n: int, size: int) -> range:
    """The aligned group of `size` consecutive items (of n) that item i is attributed with.
    Batching changes scores in the last float bits, which can swap near-tied neurons; fixed
    groups make every run (resumed, or on Ray) attribute exactly the same batches."""
    first = i - i % size
    return range(first, min(first + size, n))


class Trainer:
    """The hypernetwork's optimisation: HyperNet, AdamW, the one-cycle schedule and the metrics
    history. A step runs the frozen target with the translated deltas injected at the target's
    own neurons and updates the hypernetwork only."""

    def __init__(self, cfg: Config, target: Target, d_source: int, total: int):
        self.cfg, self.target, self.total = cfg, target, total
        self.checkpointing = cfg.train.gradient_checkpointing
        if self.checkpointing:
            if getattr(target.model.config, "attention_dropout", 0.0):
                raise ConfigError("train.gradient_checkpointing: the target has attention_dropout > 0, "
                                  "which training mode would turn on")
            target.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(cfg.seed)  # the hypernetwork's init
        self.hypernet = make_hypernet(cfg, d_source, target.arch.shape.hidden).to(target.model.device)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.hypernet.parameters(), lr=t.lr,
                                           weight_decay=t.weight_decay, betas=tuple(t.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(t.schedule, total, t.warmup_ratio, t.warmup_steps))
        self.history: list[dict] = []

    def step(self, step: int, slices: dict, index: dict, examples: list[Example]) -> dict:
        """One optimizer step on `examples` with the source's slices {module: [L_t, K, d_s]}
        injected at the target's neurons `index` {module: [L_t, K]}. The caller adds the step's
        timings to the metrics (the same dict the history keeps)."""
        arch, t = self.target.arch, self.cfg
        index = {m: i.to(self.target.model.device) for m, i in index.items()}
        batches = [lm_batch(self.target.tokenizer, examples[i:i + t.train.micro_batch_size],
                            t.data.max_length, t.data.train_on_inputs)
                   for i in range(0, len(examples), t.train.micro_batch_size)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

        def micro_step(leaves, batch) -> float:
            # backward inside the block: gradient checkpointing re-runs the hooked forward
            with injected(arch, index, leaves):
                loss = answer_loss(arch, batch, n_tokens)
                loss.backward()
            return loss.item()
        self.target.model.train(self.checkpointing)  # HF checkpoints layers only in training mode
        try:
            lm_loss, reg = hypernet_backward(self.hypernet, slices, batches, micro_step, t.train.reg_lambda)
        finally:
            self.target.model.eval()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"step": step + 1, "steps": self.total, "lm_loss": lm_loss, "reg_loss": reg,
                   "loss": lm_loss + reg, "lr": lr, "tokens": n_tokens,
                   "slice_bytes": sum(s.numel() * s.element_size() for s in slices.values())}
        self.history.append(metrics)
        return metrics

    def state(self, step: int) -> dict:
        return {"step": step, "config": self.cfg.to_dict(), "hypernet": self.hypernet.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "history": self.history,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def load_state(self, state: dict) -> None:
        self.hypernet.load_state_dict(state["hypernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def make_hypernet(cfg: Config, d_source: int, d_target: int) -> HyperNet:
    return HyperNet(d_source, d_target, cfg.transfer.modules, cfg.hypernet.hidden, cfg.hypernet.init_std)


class TargetTraining:
    """The target role of a training run: the frozen target and its selection for each extract
    example, the `Trainer`, and the run folder's checkpoints (written in the background)."""

    def __init__(self, cfg: Config, d_source: int, run_dir: Path | None = None, model=None, tokenizer=None):
        """Loads cfg.target unless an already built model and tokenizer are given."""
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.target = Target(cfg, cfg.transfer.rate, model=model, tokenizer=tokenizer)
        self.align = read_examples(cfg.data.align)
        self.extract = read_examples(cfg.data.extract)
        check_align_per_step(cfg, len(self.align))
        self.total = n_steps(cfg, len(self.extract))
        self.trainer = Trainer(cfg, self.target, d_source, self.total)
        self.selections: dict[int, Located] = {}  # extract index -> the target's selection
        self.writer = ckpt.BackgroundWriter()

    @property
    def history(self) -> list[dict]:
        return self.trainer.history

    def select(self, step: int) -> Located:
        """The target's neurons for `step`'s extract example. Its group's examples are attributed
        in one batched pass; the target is frozen, so a selection is kept."""
        i = step % len(self.extract)
        if i not in self.selections:
            members = group_of(i, len(self.extract), self.cfg.attribution.batch_size)
            for j, located in zip(members, self.target.locate([self.extract[j] for j in members])):
                self.selections[j] = located
        return self.selections[i]

    def batch_examples(self, step: int) -> list[Example]:
        split = {"extract": self.extract, "align": self.align}
        return [split[name][i] for name, i in step_examples(self.cfg, len(self.extract), len(self.align), step)]

    def step(self, step: int, source: Located) -> dict:
        """One optimizer step with the source's slices for `step`."""
        t0 = time.perf_counter()
        index = self.select(step).index
        metrics = self.trainer.step(step, source.slices, index, self.batch_examples(step))
        metrics["examples"] = [f"{name}:{i}" for name, i in
                               step_examples(self.cfg, len(self.extract), len(self.align), step)]
        metrics["target_attribution_s"] = self.target.take_seconds()
        metrics["step_s"] = time.perf_counter() - t0  # the target's selection included
        return metrics

    def save_checkpoint(self, step: int, background: bool = False, drop: int | None = None) -> Path:
        """After `step` completed steps: the checkpoint, then the metrics file, both atomic.
        `background`: snapshot the state now and write it while training goes on; a crash
        before the write ends loses only that step, which a resumed run recomputes. `drop`: an
        earlier step whose checkpoint is removed once this one is on disk."""
        path = ckpt.checkpoint_path(self.run_dir, step)
        state = ckpt.snapshot(self.trainer.state(step))
        lines = "".join(f"{json.dumps(m)}\n" for m in self.history)

        def write() -> None:
            ckpt.save_torch(state, path)
            ckpt.save_text(lines, self.run_dir / "metrics.jsonl")
            if drop is not None:
                ckpt.checkpoint_path(self.run_dir, drop).unlink(missing_ok=True)
        self.writer.submit(write, f"checkpoint-{step}", background)
        return path

    def wait_for_checkpoint(self) -> None:
        """Block until a background checkpoint is on disk; raise its error if writing failed."""
        self.writer.wait()

    def resume(self) -> int:
        """Load the run folder's last checkpoint, if any; return the steps already done."""
        steps = ckpt.checkpoint_steps(self.run_dir)
        if not steps:
            return 0
        state = ckpt.load_checkpoint(self.run_dir, steps[-1])
        self.trainer.load_state(state)
        return state["step"]


# The sections that do not change what training computes; a resumed run may differ in them.
# (attribution does: its batching moves scores in the last bits, see group_of.) The folder is
# the run, so where it is (name, output_dir) is not compared either.
_FREE_SECTIONS = ("merge", "ray", "name", "output_dir")
# Nor do these keys: the score cache returns the very bits attribution computes.
_FREE_KEYS = (("attribution", "cache"),)
IDENTITY = "identity.json"


def _compared(tree: dict) -> dict:
    """The part of a config tree that a resumed run must repeat."""
    out = {k: v for k, v in tree.items() if k not in _FREE_SECTIONS}
    for section, key in _FREE_KEYS:
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def run_identity(cfg: Config) -> dict:
    """What a resumed run must repeat, independent of how paths are spelled: the compared config
    with each model given by its files and each data spec by its records (a job's working
    directory is a fresh copy every time, so the same file has a new path in each job)."""
    from .fingerprint import data_fingerprint, model_fingerprint
    tree = _compared(cfg.to_dict())
    for role in ("source", "target"):
        fp = model_fingerprint(tree[role]["model"])
        tree[role] = {**tree[role], "model": {"config": fp["config"], "weights": fp["weights"]}}
    tree["data"] = {**tree["data"], **{k: data_fingerprint(tree["data"][k])["sha256"] for k in ("align", "extract")}}
    return json.loads(json.dumps(tree))  # as read back from the file: lists, not tuples


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder, or check that an existing one was started with the same config,
    wherever it is and however its paths were spelled (relative, absolute, through a link,
    from `laten train`, `laten train --ray` or a job)."""
    run_dir = cfg.run_dir
    current = run_identity(cfg)
    if ckpt.checkpoint_steps(run_dir):
        before = _saved_identity(run_dir)
        if before is not None and before != current:
            diff = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
            raise ConfigError(f"run folder {run_dir} holds checkpoints of a different config "
                              f"(differs in: {', '.join(diff)}); change `name` or remove the folder")
    ckpt.save_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_dir / "config.yaml")
    ckpt.save_text(json.dumps(current, indent=1, sort_keys=True), run_dir / IDENTITY)
    return run_dir


def _saved_identity(run_dir: Path) -> dict | None:
    """The identity a run folder was started with: its identity.json, or for a folder of an
    earlier release the identity of its config.yaml (its models and data read as named there)."""
    if (run_dir / IDENTITY).is_file():
        return json.loads((run_dir / IDENTITY).read_text(encoding="utf-8"))
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    from .config import config_from_dict
    try:
        return run_identity(config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}))
    except Exception as e:  # noqa: BLE001 - a folder whose models or data are gone cannot be checked
        raise ConfigError(f"run folder {run_dir} was started with a config whose models or data cannot be "
                          f"read now ({e}); change `name` or remove the folder") from None


def format_progress(m: dict) -> str:
    return (f"step {m['step']}/{m['steps']}  lm_loss {m['lm_loss']:.4f}  reg {m['reg_loss']:.3e}  "
            f"lr {m['lr']:.2e}  step {m['step_s']:.2f}s  source-attr {m.get('source_attribution_s', 0):.2f}s  "
            f"target-attr {m['target_attribution_s']:.2f}s  slices {m['slice_bytes'] / 1e6:.2f} MB")


def train(cfg: Config, on_step: Callable[[dict], None] | None = None,
          source_edit: Callable[[int, Located], Located] | None = None,
          keep: Collection[int] | None = None, source: Source | None = None, target_model=None) -> Path:
    """Train in this process, resuming from the run folder's last checkpoint; returns the run folder.
    `source_edit(step, located)` replaces the source's selection of a step (a study's control
    arms: noise in place of the source's slices). `keep`: the steps whose checkpoints stay (the
    last one always does); default every step. `source` and `target_model` (model, tokenizer):
    models already loaded, e.g. to merge with afterwards; the target is left unchanged."""
    run_dir = prepare_run_dir(cfg)
    source = source or Source(cfg)
    model, tokenizer = target_model or (None, None)
    side = TargetTraining(cfg, source.arch.shape.hidden, run_dir, model=model, tokenizer=tokenizer)
    start = side.resume()
    n, group = len(side.extract), cfg.attribution.batch_size
    ready: dict[int, Located] = {}  # extract index -> the source's selection, the current group's
    try:
        for step in range(start, side.total):
            i = step % n
            if i not in ready:  # fixed groups of extract examples, whatever the step (see group_of)
                ready = source_group(source, side.extract, i, group, side.target.arch.shape, side.target.counts)
            slices = ready.pop(i)
            if source_edit:
                slices = source_edit(step, slices)
            metrics = side.step(step, slices)
            metrics["source_attribution_s"] = source.take_seconds()
            side.save_checkpoint(step + 1, background=True,  # written while the next step runs
                                 drop=step if keep is not None and step and step not in keep else None)
            if on_step:
                on_step(metrics)
    finally:
        side.wait_for_checkpoint()
    return run_dir
