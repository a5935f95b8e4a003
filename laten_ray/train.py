"""Train the hypernetwork (DESIGN.md §6), split into the two roles that Ray later puts on two GPUs.

SourceSide: the source model; attribution + layer alignment + slices for each extract example.
TrainerSide: the frozen target + hypernetwork + optimizer; target attribution, steps, checkpoints.
`train` wires them together in one process.
"""
from __future__ import annotations

import copy
import json
import math
import random
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

from . import checkpoint as ckpt
from .arch import Arch, Shape
from .attribution import attribute_each
from .config import Config, ConfigError
from .data import Example, lm_batch, load_examples
from .hypernet import HyperNet
from .inject import injected
from .locate import Located, locate_source, locate_target, neuron_counts
from .models import load_model, load_tokenizer, pick_device


def n_steps(cfg: Config, n_extract: int) -> int:
    return cfg.train.steps if cfg.train.steps is not None else n_extract


def one_cycle(total: int, warmup_ratio: float, start: float = 1 / 25, end: float = 1e-4):
    """LR factor for step i: cosine rise from `start` to 1 over the warm-up, cosine fall to `end`."""
    warm = round(total * warmup_ratio)

    def factor(i: int) -> float:
        if i < warm:
            return start + (1 - start) * (1 - math.cos(math.pi * i / warm)) / 2
        progress = (i - warm) / max(1, total - warm)
        return end + (1 - end) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    return factor


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
    logits = arch.lm_head()(hidden[:, :-1][keep]).float()     # [N, V]
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


def group_of(i: int, n: int, size: int) -> range:
    """The aligned group of `size` consecutive items (of n) that item i is attributed with.
    Batching changes scores in the last float bits, which can swap near-tied neurons; fixed
    groups make every run (resumed, or on Ray) attribute exactly the same batches."""
    first = i - i % size
    return range(first, min(first + size, n))


class SourceSide:
    def __init__(self, cfg: Config, model=None, tokenizer=None):
        """Loads cfg.source unless an already built model and tokenizer are given."""
        self.cfg = cfg
        self.tokenizer = tokenizer or load_tokenizer(cfg.source.model)
        self.model = model or load_model(cfg.source.model, cfg.source.dtype, pick_device(cfg.source.device))
        self.arch = Arch(self.model)
        self.attribution_seconds = 0.0

    def locate(self, examples: list[Example], target: Shape, counts: dict[str, int],
               on_cpu: bool = True) -> list[Located]:
        """For each example: slices of the source's top neurons in its best L_t layers (on CPU
        unless `on_cpu` is False). The examples share each per-layer projection, so a batch
        costs little more than one."""
        t0 = time.perf_counter()
        each = attribute_each(self.arch, self.tokenizer, examples, self.cfg.attribution.batch_size,
                              self.cfg.attribution.chunk_mb << 20)
        self.attribution_seconds += time.perf_counter() - t0
        out = []
        for scores in each:
            located = locate_source(self.arch, scores, target, counts)
            if on_cpu:
                located.slices = {m: s.detach().cpu() for m, s in located.slices.items()}
            out.append(located)
        return out


class TrainerSide:
    def __init__(self, cfg: Config, d_source: int, run_dir: Path | None = None, model=None,
                 tokenizer=None):
        """Loads cfg.target unless an already built model and tokenizer are given."""
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.tokenizer = tokenizer or load_tokenizer(cfg.target.model)
        self.model = model or load_model(cfg.target.model, cfg.target.dtype, pick_device(cfg.target.device))
        self.device = self.model.device
        self.arch = Arch(self.model)
        self.checkpointing = cfg.train.gradient_checkpointing
        if self.checkpointing:
            if getattr(self.model.config, "attention_dropout", 0.0):
                raise ConfigError("train.gradient_checkpointing: the target has attention_dropout > 0, "
                                  "which training mode would turn on")
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.align = load_examples(cfg.data.align)
        self.extract = load_examples(cfg.data.extract)
        self.total = n_steps(cfg, len(self.extract))
        self.counts = neuron_counts(self.arch.shape, cfg.transfer.rate, cfg.transfer.modules)
        torch.manual_seed(cfg.seed)  # the hypernetwork's init
        self.hypernet = HyperNet(d_source, self.arch.shape.hidden, cfg.transfer.modules,
                                 cfg.hypernet.hidden, cfg.hypernet.init_std).to(self.device)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.hypernet.parameters(), lr=t.lr,
                                           weight_decay=t.weight_decay, betas=tuple(t.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, one_cycle(self.total, t.warmup_ratio))
        self.history: list[dict] = []
        self.selections: dict[int, Located] = {}  # extract index -> the target's selection
        self.attribution_seconds = 0.0  # since the last step's metrics
        self._saver: threading.Thread | None = None  # a checkpoint being written in the background
        self._save_error: BaseException | None = None

    def locate(self, examples: list[Example]) -> list[Located]:
        """The target's own top-K neurons for each example (the target is frozen: no injection)."""
        t0 = time.perf_counter()
        each = attribute_each(self.arch, self.tokenizer, examples, self.cfg.attribution.batch_size,
                              self.cfg.attribution.chunk_mb << 20)
        self.attribution_seconds += time.perf_counter() - t0
        return [locate_target(scores, self.arch.shape, self.counts) for scores in each]

    def prepare(self, step: int) -> None:
        """Select the target neurons of the extract examples in `step`'s group in one batched
        pass. The target is frozen, so a selection never changes and is kept."""
        i = step % len(self.extract)
        if i in self.selections:
            return
        members = group_of(i, len(self.extract), self.cfg.attribution.batch_size)
        for j, located in zip(members, self.locate([self.extract[j] for j in members])):
            self.selections[j] = located

    def batch_examples(self, step: int) -> list[Example]:
        picks = align_sample(len(self.align), self.cfg.train.align_per_step, self.cfg.seed, step)
        return [self.extract[step % len(self.extract)]] + [self.align[i] for i in picks]

    def step(self, step: int, source: Located) -> dict:
        """One optimizer step on (extract example + align examples) with the source's slices."""
        t0 = time.perf_counter()
        self.prepare(step)
        target = self.selections[step % len(self.extract)]
        index = {m: i.to(self.device) for m, i in target.index.items()}
        examples = self.batch_examples(step)
        t = self.cfg
        batches = [lm_batch(self.tokenizer, examples[i:i + t.train.micro_batch_size],
                            t.data.max_length, t.data.train_on_inputs)
                   for i in range(0, len(examples), t.train.micro_batch_size)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

        def micro_step(leaves, batch) -> float:
            # backward inside the block: gradient checkpointing re-runs the hooked forward
            with injected(self.arch, index, leaves):
                loss = answer_loss(self.arch, batch, n_tokens)
                loss.backward()
            return loss.item()
        self.model.train(self.checkpointing)  # HF checkpoints layers only in training mode
        try:
            lm_loss, reg = hypernet_backward(self.hypernet, source.slices, batches, micro_step,
                                             t.train.reg_lambda)
        finally:
            self.model.eval()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"step": step + 1, "steps": self.total, "lm_loss": lm_loss, "reg_loss": reg,
                   "loss": lm_loss + reg, "lr": lr, "tokens": n_tokens,
                   "target_attribution_s": self.attribution_seconds,
                   "slice_bytes": source.nbytes(), "step_s": time.perf_counter() - t0}
        self.attribution_seconds = 0.0
        self.history.append(metrics)
        return metrics

    # --- checkpoints ------------------------------------------------------------------------
    def state(self, step: int) -> dict:
        return {"step": step, "config": self.cfg.to_dict(), "hypernet": self.hypernet.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "history": self.history,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def save_checkpoint(self, step: int, background: bool = False) -> Path:
        """After `step` completed steps: the checkpoint, then the metrics file, both atomic.

        `background`: snapshot the state (a copy) now and write it in a thread while training
        goes on; the next save, or `wait_for_checkpoint`, waits for it. A crash before the write
        ends loses only that step, which a resumed run recomputes to the same result."""
        self.wait_for_checkpoint()
        path = ckpt.checkpoint_path(self.run_dir, step)
        state = _snapshot(self.state(step))
        lines = "".join(f"{json.dumps(m)}\n" for m in self.history)

        def write() -> None:
            ckpt.save_torch(state, path)
            ckpt.save_text(lines, self.run_dir / "metrics.jsonl")
        if not background:
            write()
            return path

        def run() -> None:
            try:
                write()
            except BaseException as e:  # noqa: BLE001 - raised again by wait_for_checkpoint
                self._save_error = e
        self._saver = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=True)
        self._saver.start()
        return path

    def wait_for_checkpoint(self) -> None:
        """Block until a background checkpoint is on disk; raise its error if writing failed."""
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.join()
        error, self._save_error = self._save_error, None
        if error is not None:
            raise error

    def resume(self) -> int:
        """Load the last checkpoint of the run folder, if any; return the steps already done."""
        steps = ckpt.checkpoint_steps(self.run_dir)
        if not steps:
            return 0
        state = ckpt.load_checkpoint(self.run_dir, steps[-1])
        self.hypernet.load_state_dict(state["hypernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["step"]


def _snapshot(obj):
    """A copy of a state tree whose tensors are detached CPU copies (training goes on meanwhile)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


# The sections that do not change what training computes; a resumed run may differ in them.
# (attribution does: its batching moves scores in the last bits, see group_of.)
_FREE_SECTIONS = ("merge", "ray")


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder, or check that an existing one was started with the same config."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    current = {k: v for k, v in cfg.to_dict().items() if k not in _FREE_SECTIONS}
    if saved.is_file() and ckpt.checkpoint_steps(run_dir):
        before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        before = {k: v for k, v in before.items() if k not in _FREE_SECTIONS}
        if before != current:
            diff = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
            raise ConfigError(f"run folder {run_dir} holds checkpoints of a different config "
                              f"(differs in: {', '.join(diff)}); change `name` or remove the folder")
    ckpt.save_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), saved)
    return run_dir


def format_progress(m: dict) -> str:
    return (f"step {m['step']}/{m['steps']}  lm_loss {m['lm_loss']:.4f}  reg {m['reg_loss']:.3e}  "
            f"lr {m['lr']:.2e}  step {m['step_s']:.2f}s  source-attr {m.get('source_attribution_s', 0):.2f}s  "
            f"target-attr {m['target_attribution_s']:.2f}s  slices {m['slice_bytes'] / 1e6:.2f} MB")


def train(cfg: Config, on_step: Callable[[dict], None] | None = None) -> Path:
    """Train in this process, resuming from the run folder's last checkpoint; returns the run folder."""
    run_dir = prepare_run_dir(cfg)
    source = SourceSide(cfg)
    trainer = TrainerSide(cfg, source.arch.shape.hidden, run_dir)
    start = trainer.resume()
    group = cfg.attribution.batch_size
    try:
        for first in range(start - start % group, trainer.total, group):
            steps = group_of(first, trainer.total, group)
            located = source.locate([trainer.extract[s % len(trainer.extract)] for s in steps],
                                    trainer.arch.shape, trainer.counts)
            for step, slices in zip(steps, located):
                if step < start:
                    continue  # done before a resume; its group is recomputed whole (see group_of)
                trainer.prepare(step)
                metrics = trainer.step(step, slices)
                metrics["source_attribution_s"], source.attribution_seconds = source.attribution_seconds, 0.0
                trainer.save_checkpoint(step + 1, background=True)  # written while the next step runs
                if on_step:
                    on_step(metrics)
    finally:
        trainer.wait_for_checkpoint()
    return run_dir
