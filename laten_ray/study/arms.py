"""The arms of a study (docs/method.md §10): each turns (study, seed) into an HF model folder
that is evaluated like every other arm. The registry is open: `register(arm)` adds one.

- `target`, `source`: the models as they are (one model for every seed).
- `laten`: train + merge.
- `laten-random-neurons` (control): `laten`'s trained hypernetwork and deltas, added at random
  target neurons (same layers, same K, none of the located ones) instead of the attributed ones.
- `laten-noise-source` (control): LaTen trained and merged with every source slice replaced by
  a random vector of the same norm: what LaTen gains without the source's knowledge.
- `sft-lora`: LoRA fine-tuning of the target on exactly LaTen's examples, in LaTen's order, with
  as many optimizer steps: the equal-data baseline.
- `seeking`: Zhong et al.'s post-align transfer: the source's most sensitive sub-matrices as the
  target's LoRA start, then LoRA post-alignment (by default on sft-lora's examples and steps).
- `distill`: the target LoRA-fine-tuned on the source's own answers to LaTen's examples.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..fingerprint import data_fingerprint, model_fingerprint
from ..locate import Located
from ..records import read_records

ARMS: dict[str, "Arm"] = {}


def budget_key(budget: int | None) -> str:
    """A budget as a key of built.json's models and plan.json's evals: "64", or "-" for none."""
    return "-" if budget is None else str(budget)


def largest_budget(keys) -> str:
    """Of budget keys (budget_key), the largest budget's; "-" counts as the smallest."""
    return max(keys, key=lambda k: -1 if k == "-" else int(k))


def model_folder(budget: int | None) -> str:
    """The arm's HF folder of a budget, inside its unit folder."""
    return "model" if budget is None else f"model-{budget}"


def register(arm: "Arm") -> "Arm":
    ARMS[arm.name] = arm
    return arm


class Arm:
    """An arm; `study` is a StudyConfig (study/config.py, which checks arm names against ARMS)."""
    name = ""
    seeded = True        # one model per seed; False: one model for every seed
    trains = False       # has a loss curve (metrics.jsonl) for the report
    needs: tuple[str, ...] = ()  # arms of the same seed whose folders this one reads
    in_driver = False    # builds in no time (no model work): the driver does it, not a Ray task
    ray_train = False    # on Ray its training is a Ray Train run, whose workers hold the GPUs

    def key(self, study, seed: int | None) -> dict:
        """Everything that determines this arm's model (hashed into its folder's name)."""
        raise NotImplementedError

    def build(self, study, seed: int | None, folder: Path, needs: dict[str, Path]) -> dict:
        """Make the model of every budget in `folder` (resuming what a killed build left there);
        return {"models": {budget_key: its folder relative to `folder`}, or {"model": a spec,
        "as_is": True}, and "metrics": a metrics.jsonl relative to `folder`, or None}."""
        raise NotImplementedError


def run_key(study, seed: int) -> dict:
    """What a LaTen run computes from: its config without folders, Ray placement or the score
    cache, and the fingerprints of the pair and data."""
    cfg = study.run_config(seed).to_dict()
    for k in ("name", "output_dir", "ray"):
        cfg.pop(k)
    cfg["attribution"].pop("cache", None)
    return {"run": cfg, "source": model_fingerprint(study.source.model), "target": model_fingerprint(study.target.model),
            "align": data_fingerprint(study.task.align), "extract": data_fingerprint(study.task.extract)}


# --- the arms --------------------------------------------------------------------------------

class AsIs(Arm):
    seeded = False
    in_driver = True

    def __init__(self, name: str, role: str):
        self.name, self.role = name, role

    def key(self, study, seed):
        return {"model": model_fingerprint(getattr(study, self.role).model)}

    def build(self, study, seed, folder, needs):
        return {"model": getattr(study, self.role).model, "as_is": True, "metrics": None}


def loaded_pair(cfg):
    """The source (a locate.Source) and the target (model, tokenizer), loaded once for a unit's
    training and every merge."""
    from ..locate import Source
    from ..models import load_model, load_tokenizer, pick_device
    target = load_model(cfg.target.model, cfg.target.dtype, pick_device(cfg.target.device))
    return Source(cfg), (target, load_tokenizer(cfg.target.model))


def merge_budgets(study, cfg, folder: Path, source, target, **edits) -> dict[str, str]:
    """Merge the run's checkpoint of every budget into its own folder; one already merged (a
    resumed build) is kept."""
    from ..hints import MERGE_REPORT
    from ..merge import merge
    models = {}
    for budget in study.budget_list:
        out = folder / model_folder(budget)
        if not (out / MERGE_REPORT).is_file():
            merge(cfg, budget, None, out, overwrite=True, source=source, target_model=target,
                  say=lambda line: None, **edits)  # the report shows what the merge measured
        models[budget_key(budget)] = out.name
    return models


class Laten(Arm):
    name = "laten"
    trains = True

    def key(self, study, seed):
        return run_key(study, seed)

    def build(self, study, seed, folder, needs):
        from ..train import train
        cfg = study.run_config(seed, folder / "run")
        source, target = loaded_pair(cfg)
        t0 = time.perf_counter()
        train(cfg, source_edit=self.train_edit(seed), keep=[b for b in study.budget_list if b],
              source=source, target_model=target)
        t1 = time.perf_counter()
        models = merge_budgets(study, cfg, folder, source, target, **self.merge_edits(study, seed))
        return {"models": models, "metrics": "run/metrics.jsonl", "train_s": t1 - t0,
                "merge_s": time.perf_counter() - t1}

    def train_edit(self, seed: int):
        return None

    def merge_edits(self, study, seed: int) -> dict:
        return {}


def noise_like(located: Located, seed: int, salt: int) -> Located:
    """The selection with every slice row replaced by a random direction of the same norm. The
    directions come from (seed, salt, module) alone, never from the source's weights. [L_t, K, d_s]"""
    slices = {}
    for m_i, (module, s) in enumerate(sorted(located.slices.items())):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + salt) * 16 + m_i) % (1 << 63))
        noise = torch.randn(s.shape, generator=g, dtype=torch.float32)  # [L_t, K, d_s]
        norms = s.float().norm(dim=-1, keepdim=True).cpu()               # [L_t, K, 1]
        slices[module] = (noise / noise.norm(dim=-1, keepdim=True) * norms).to(s.dtype).to(s.device)
    return replace(located, slices=slices)


class LatenNoiseSource(Laten):
    name = "laten-noise-source"

    def key(self, study, seed):
        return {**run_key(study, seed), "control": "noise-source"}

    def train_edit(self, seed):
        return lambda step, located: noise_like(located, seed, step + 1)

    def merge_edits(self, study, seed):
        return {"source_edit": lambda located: noise_like(located, seed, 0), "control": "noise-source"}


def random_neurons(located: Located, sizes: dict[str, int], seed: int) -> Located:
    """For every module and layer, K target neurons drawn at random among those not located
    (seeded by seed, module, layer), in place of the located ones. [L_t, K]"""
    index = {}
    for m_i, (module, idx) in enumerate(sorted(located.index.items())):
        n, (layers, k) = sizes[module], idx.shape
        if n - k < k:
            raise ValueError(f"laten-random-neurons: K={k} {module} neurons of {n} leaves fewer than K "
                             "unlocated ones to draw from; use transfer.rate <= 0.5")
        rows = []
        for layer in range(layers):
            g = torch.Generator().manual_seed((seed * 1_000_003 + m_i) * 4096 + layer)
            free = torch.ones(n, dtype=torch.bool)
            free[idx[layer].cpu()] = False
            candidates = free.nonzero().squeeze(1)                                # [n - K]
            rows.append(candidates[torch.randperm(candidates.numel(), generator=g)[:k]])
        index[module] = torch.stack(rows).to(idx.device)                           # [L_t, K]
    return replace(located, index=index)


class LatenRandomNeurons(Arm):
    name = "laten-random-neurons"
    needs = ("laten",)

    def key(self, study, seed):
        return {**run_key(study, seed), "control": "random-neurons"}

    def build(self, study, seed, folder, needs):
        from ..arch import shape_of
        from ..models import read_model_config
        shape = shape_of(read_model_config(study.target.model))
        cfg = study.run_config(seed, needs["laten"] / "run")  # laten's trained hypernetwork
        sizes = {m: shape.neurons(m) for m in cfg.transfer.modules}
        t0 = time.perf_counter()
        models = merge_budgets(study, cfg, folder, *loaded_pair(cfg), control="random-neurons",
                               target_edit=lambda located: random_neurons(located, sizes, seed))
        return {"models": models, "metrics": None, "merge_s": time.perf_counter() - t0}


def laten_steps(study, seed: int):
    """The examples of each of LaTen's steps for this seed (train.step_examples), as examples and
    as labels ("extract:3", "align:17"), and the run config they come from."""
    from ..data import read_examples
    from ..train import n_steps, step_examples
    cfg = study.run_config(seed)
    split = {"extract": read_examples(cfg.data.extract), "align": read_examples(cfg.data.align)}
    plan = [step_examples(cfg, len(split["extract"]), len(split["align"]), step)
            for step in range(n_steps(cfg, len(split["extract"])))]
    return cfg, [[split[n][i] for n, i in step] for step in plan], [[f"{n}:{i}" for n, i in step] for step in plan]


def ray_train_run(study) -> bool:
    """Whether a LoRA arm's training is a Ray Train run: on a Ray cluster (a study's build task)
    unless `ray.train_workers` is 0; elsewhere (`laten arm`, a test) it runs in this process."""
    import ray
    return study.ray.train_workers > 0 and ray.is_initialized()


def before_training(study, fn, *args):
    """fn(*args): a LoRA arm's work before training (the source's answers, Seeking's plan), whose
    results are kept in the unit's folder. Before a Ray Train run on GPUs it runs in a task of its
    own holding the build's GPUs: the build task that waits on the run holds none (jobs/study.py),
    or the run's workers could wait for them forever."""
    if not (ray_train_run(study) and study.ray.num_gpus):
        return fn(*args)
    import ray
    r = study.ray
    return ray.get(ray.remote(fn).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus).remote(*args))


def lora_build(study, cfg, seed: int, folder: Path, steps: list, labels: list, lora, note: dict,
               init=None) -> dict:
    """LoRA-fine-tune the target on `steps`, one optimizer step each, and write the merged folder
    of every budget; what every LoRA arm shares. The labels of each step go to sft/examples.json.
    On Ray, a Ray Train run of `ray.train_workers` workers, each running lora_train on its part
    of every step (study/ray_train.py); else lora_train here. `init` must pickle (a worker gets it)."""
    (folder / "sft").mkdir(parents=True, exist_ok=True)
    ckpt.save_json(labels, folder / "sft" / "examples.json")
    job = {"study": study, "cfg": cfg, "seed": seed, "folder": folder, "steps": steps, "lora": lora,
           "note": note, "init": init}
    if ray_train_run(study):
        from .ray_train import fit
        return fit(lora_train, job)
    return lora_train(**job)


def lora_train(study, cfg, seed: int, folder: Path, steps: list, lora, note: dict, init=None,
               shard=None, on_step=None) -> dict:
    """lora.finetune on `steps` (with `shard`: this process's part of each; rank 0 writes) and the
    merged folder of every budget; returns the build's "models", "metrics", "train_s", "merge_s"."""
    from ..lora import Optim, finetune
    from ..models import load_model, load_tokenizer, pick_device
    t = cfg.train
    optim = Optim(t.micro_batch_size, cfg.data.max_length, cfg.data.train_on_inputs, t.weight_decay,
                  tuple(t.betas), t.warmup_ratio, t.schedule, t.warmup_steps)
    tokenizer = load_tokenizer(cfg.target.model)
    model = load_model(cfg.target.model, cfg.target.dtype, pick_device(cfg.target.device))
    budgets = [b for b in study.budget_list if b is not None]
    merge_s = 0.0

    def save(budget: int | None, merged) -> None:
        nonlocal merge_s
        t = time.perf_counter()
        ckpt.save_model_folder(merged, tokenizer, folder / model_folder(budget), {"laten_sft.json": {
            **note, "lora": asdict(lora), "steps": budget or len(steps)}})
        merge_s += time.perf_counter() - t
    t0 = time.perf_counter()
    merged, _ = finetune(model, tokenizer, steps, lora, optim, seed, folder / "sft", on_step=on_step, init=init,
                         at_budget=save, budgets=tuple(budgets), shard=shard)
    if shard is None or shard.rank == 0:
        save(study.budget_list[-1], merged)
    return {"models": {budget_key(b): model_folder(b) for b in study.budget_list}, "metrics": "sft/metrics.jsonl",
            "train_s": time.perf_counter() - t0 - merge_s, "merge_s": merge_s}


class SftLora(Arm):
    name = "sft-lora"
    trains = True
    ray_train = True  # on Ray its training is a Ray Train run (lora_build)

    def key(self, study, seed):
        run = run_key(study, seed)
        keep = ("seed", "data", "train")  # the examples, their order and the optimizer's settings
        return {"run": {k: run["run"][k] for k in keep}, "target": run["target"], "align": run["align"],
                "extract": run["extract"], "sft": asdict(study.sft)}

    def build(self, study, seed, folder, needs):
        cfg, steps, labels = laten_steps(study, seed)
        return lora_build(study, cfg, seed, folder, steps, labels, study.sft, {"arm": self.name})


class Distill(SftLora):
    """Sequence-level distillation: the source answers the prompts of LaTen's examples (greedy,
    through the evaluation engine), and the target is LoRA-fine-tuned on those answers with
    sft-lora's steps and settings."""
    name = "distill"

    def key(self, study, seed):
        return {**super().key(study, seed), "source": model_fingerprint(study.source.model),
                "distill": asdict(study.distill), "engine": study.engine}

    def build(self, study, seed, folder, needs):
        cfg, steps, labels = laten_steps(study, seed)
        unique = dict(zip(itertools.chain(*labels), itertools.chain(*steps)))  # label -> example
        answers = before_training(study, source_answers, study, unique, folder / "distill" / "answers.jsonl")
        steps = [[replace_answer(e, answers[lab]) for e, lab in zip(step, step_labels)]
                 for step, step_labels in zip(steps, labels)]
        return lora_build(study, cfg, seed, folder, steps, labels, study.sft, {"arm": self.name})


class Seeking(SftLora):
    """Zhong et al.'s post-align transfer ("Seeking Neural Nuggets", laten_ray/seeking.py): the
    source's most sensitive layers and sub-matrices, low-rank, as the target's LoRA start (the
    start equals the target), then LoRA post-alignment with sft-lora's settings at
    `seeking.rank`, on LaTen's examples and steps (equal data) or on `seeking.data`."""
    name = "seeking"

    def key(self, study, seed):
        return {**super().key(study, seed), "source": model_fingerprint(study.source.model),
                "seeking": asdict(study.seeking),
                **({} if study.seeking.data == "laten" else {"data": data_fingerprint(study.seeking.data)})}

    def build(self, study, seed, folder, needs):
        from ..data import read_examples
        k = study.seeking
        cfg, steps, labels = laten_steps(study, seed)
        if k.data != "laten":
            steps, labels = epochs_of(read_examples(k.data), k.epochs, len(steps[0]), seed)
        saved = folder / "seeking" / "plan.pt"
        if not saved.is_file():  # the sensitivity pass runs once; a resumed build reads its plan
            before_training(study, seeking_plan, study, cfg, saved)
        return lora_build(study, cfg, seed, folder, steps, labels, replace(study.sft, rank=k.rank),
                          {"arm": self.name, "seeking": asdict(k)}, init=partial(seeking_start, saved))


def seeking_plan(study, cfg, saved: Path) -> None:
    """Seeking's extraction from the source (the target's shapes come from its config): the plan
    in `saved` and its summary in plan.json beside it."""
    from ..data import read_examples
    from ..models import load_model, load_tokenizer, pick_device, read_model_config
    from ..seeking import extract
    k = study.seeking
    source = load_model(cfg.source.model, cfg.source.dtype, pick_device(cfg.source.device))
    plan = extract(source, load_tokenizer(cfg.source.model), read_model_config(cfg.target.model),
                   read_examples(cfg.data.align, limit=k.seed_examples), rank=k.rank,
                   max_length=cfg.data.max_length, gradient_checkpointing=k.gradient_checkpointing)
    ckpt.save_json(plan.to_json(), saved.parent / "plan.json")
    ckpt.save_torch(plan, saved)


def seeking_start(saved: Path, peft_model) -> None:
    """The LoRA start of Seeking: the plan's pieces (lora.finetune's `init`; read where it trains)."""
    from ..seeking import init_lora
    init_lora(peft_model, torch.load(saved, weights_only=False))


def epochs_of(examples: list, epochs: int, per_step: int, seed: int) -> tuple[list, list]:
    """`epochs` passes over `examples`, each in an order drawn from (seed, epoch), cut into
    steps of `per_step` (the last step of a pass may be shorter)."""
    steps, labels = [], []
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        for i in range(0, len(order), per_step):
            steps.append([examples[j] for j in order[i:i + per_step]])
            labels.append([f"data:{j}" for j in order[i:i + per_step]])
    return steps, labels


def replace_answer(example, answer: str):
    return replace(example, messages=(*example.messages[:-1], {"role": "assistant", "content": answer}))


def source_answers(study, examples: dict, path: Path) -> dict[str, str]:
    """label -> the source's greedy answer to the example's prompt, generated once and kept in
    `path` (with the prompt and the reference answer, for the analysis)."""
    if path.is_file():
        kept = {r["example"]: r["answer"] for _, r in read_records(str(path))}
        if set(kept) == set(examples):
            return kept
    from ..data import chat_prompt
    from ..generate import Sampling, engine_from_settings
    from ..eval.protocol import TURN_STOPS
    from ..models import load_tokenizer
    prompts = {label: chat_prompt(e.messages) for label, e in examples.items()}
    tokenizer = load_tokenizer(study.source.model)
    ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in prompts.values()]  # as training encodes
    settings = {"engine": study.engine, "dtype": study.source.dtype, "device": study.source.device}
    eng = engine_from_settings(study.source.model, settings, max(map(len, ids)) + study.distill.max_tokens,
                               log_dir=path.parent)  # a fallback's line is in this build's log
    generated = eng.generate_ids(ids, Sampling(max_tokens=study.distill.max_tokens, stop=list(TURN_STOPS)))
    getattr(eng, "close", lambda: None)()
    answers = {label: gens[0].strip() for label, gens in zip(prompts, generated)}
    ckpt.save_text("".join(json.dumps({"example": label, "prompt": prompts[label], "answer": answers[label],
                                       "reference": examples[label].answer}) + "\n" for label in prompts), path)
    return answers


for _arm in (AsIs("target", "target"), AsIs("source", "source"), Laten(), LatenRandomNeurons(),
             LatenNoiseSource(), SftLora(), Seeking(), Distill()):
    register(_arm)
