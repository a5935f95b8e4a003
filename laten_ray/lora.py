"""LoRA fine-tuning of the target (with `peft`) on given steps of examples, merged into an
ordinary HF folder: a study's equal-data baseline `sft-lora` (docs/method.md §10).

A step is a list of examples and one optimizer step, with the loss LaTen trains with (answer
tokens summed over the step, divided by their count; micro-batched) and the same optimizer and
one-cycle schedule, so the only differences from LaTen are what is trained and the learning
rate. Every step is checkpointed (adapter, optimizer, schedule, history), so a killed run resumes
to the same weights.

Data-parallel (a study's Ray Train run of several workers, laten_ray/study/ray_train.py): every
process runs this same loop on its Shard of each step's examples, and the token count, the
adapter's gradients and the loss are summed over the processes before the optimizer step, so a
step is the step one process takes on all of them (up to float summation order).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .arch import Arch
from .data import Example, lm_batch
from .train import answer_loss, lr_schedule

STATE = "lora_state.pt"


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0      # 0: a resumed run is bit-identical to an uninterrupted one
    lr: float = 3e-4          # the post-alignment LoRA rate of Zhong et al. (ICLR 2024)
    modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft target_modules


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel run: examples rank, rank + size, ... of every step;
    torch.distributed is initialized (gloo on CPU, nccl on GPU). Rank 0 writes the files."""
    rank: int
    size: int

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(values)  # in place, the sum over the processes
        return values

    def sum_grads(self, params: list) -> None:
        """Each parameter's gradient summed over the processes, in one collective; a process
        without examples in this step adds zeros."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))  # [sum of the adapter's sizes]
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).to(p.dtype)


@dataclass
class Optim:
    """What LoRA shares with the LaTen run it is compared with."""
    micro_batch_size: int = 4
    max_length: int = 1024
    train_on_inputs: bool = False
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.3
    schedule: str = "one-cycle"
    warmup_steps: int | None = None


def finetune(model, tokenizer, steps: list[list[Example]], lora: LoraSettings, optim: Optim, seed: int,
             folder: Path, on_step: Callable[[dict], None] | None = None,
             init: Callable[[object], None] | None = None,
             at_budget: Callable[[int, object], None] | None = None, budgets: tuple[int, ...] = (),
             shard: Shard | None = None):
    """Train a LoRA adapter on `steps` (resuming from `folder`'s state), merge it into `model`
    and return (the merged model, the per-step history). `init(peft_model)` sets the adapter's
    start (a baseline's extracted weights) before training; a resumed run calls it again, so it
    must be deterministic, then loads the adapter's trained state over it. After each step B in
    `budgets` (before the last), `at_budget(B, merged copy)` gets the model as it is then; it
    runs before step B's state is saved, so a resumed run never skips it. With `shard` this process
    trains on its part of each step (module docstring) and only rank 0 writes."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(seed)  # LoRA's A init
    modules = lora.modules[0] if lora.modules == ["all-linear"] else lora.modules
    peft_model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                  target_modules=modules, bias="none", task_type="CAUSAL_LM"))
    if init:
        init(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lora.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(optim.schedule, len(steps), optim.warmup_ratio, optim.warmup_steps))
    history: list[dict] = []
    state_path = Path(folder) / STATE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        torch.set_rng_state(state["rng"])
    arch = Arch(model)  # peft edits the model's own linear layers in place
    writes = shard is None or shard.rank == 0
    model.train()
    for i in range(len(history), len(steps)):
        t0 = time.perf_counter()
        examples = steps[i] if shard is None else steps[i][shard.rank::shard.size]
        batches = [lm_batch(tokenizer, examples[j:j + optim.micro_batch_size], optim.max_length,
                            optim.train_on_inputs) for j in range(0, len(examples), optim.micro_batch_size)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        if shard:  # the loss is normalized by the whole step's tokens
            n_tokens = int(shard.sum(torch.tensor([n_tokens], device=params[0].device)).item())
        lm_loss = 0.0
        for batch in batches:
            loss = answer_loss(arch, batch, n_tokens)
            loss.backward()
            lm_loss += loss.item()
        if shard:
            shard.sum_grads(params)
            lm_loss = shard.sum(torch.tensor([lm_loss], dtype=torch.float64, device=params[0].device)).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"step": i + 1, "steps": len(steps), "lm_loss": lm_loss, "lr": lr, "tokens": n_tokens,
                   "step_s": time.perf_counter() - t0}
        history.append(metrics)
        if writes and at_budget and i + 1 in budgets and i + 1 < len(steps):
            model.eval()
            at_budget(i + 1, copy.deepcopy(peft_model).merge_and_unload())  # the adapter of step B, merged
            model.train()
        if writes:
            ckpt.save_torch({"adapter": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "history": history, "rng": torch.get_rng_state()},
                            state_path)
            ckpt.save_text("".join(json.dumps(m) + "\n" for m in history), Path(folder) / "metrics.jsonl")
        if on_step:
            on_step(metrics)
    model.eval()
    return peft_model.merge_and_unload(), history
