"""Generation backends of the server: vLLM's async engine (continuous batching), or
transformers one request at a time. Both stream (choice index, text delta, finish, tokens),
stop work for a client that has gone, and say whether they are dead or stuck."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from ..eval.engines import Sampling, next_tokens, use_vllm, vllm_sampling
from ..eval.fallback import EngineLog, log_path


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot run this model (found at start, before serving)."""


class Progress:
    """Requests in flight and when a token last came out: an engine with work and no token
    for a long time is stuck."""

    def __init__(self) -> None:
        self.running, self.tokens, self.last = 0, 0, time.monotonic()

    def begin(self) -> None:
        if self.running == 0:
            self.last = time.monotonic()  # the stall clock starts with the work
        self.running += 1

    def token(self, count: int = 1) -> None:
        self.tokens += count
        self.last = time.monotonic()

    def end(self) -> None:
        self.running -= 1

    def stalled_s(self) -> float:
        return time.monotonic() - self.last if self.running else 0.0


@dataclass
class _Job:
    ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Backend:
    """What both engines share: the tokenizer's ids, and the first token generated at start."""
    name: str
    tokenizer = None
    fallback: str | None = None  # why vLLM was not used, when `auto` fell back

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    async def warm_up(self) -> None:
        """One token: some models load but fail at their first step (vLLM's CPU backend lacks
        some attention shapes), and that kills the engine."""
        async for _ in self.stream(self.encode("a")[:1] or [0], Sampling(max_tokens=1, temperature=0)):
            pass


class HFBackend(Backend):
    """transformers, one sequence at a time on one worker thread (a fallback, not a throughput
    engine). A request whose client has gone is skipped, or stopped at its next token."""
    name = "hf"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None):
        from ..models import load_model, load_tokenizer, pick_device
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, dtype, pick_device(device))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.context = min(self.context, max_model_len or self.context)
        self.progress = Progress()
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="laten-hf-engine", daemon=True)
        self.worker.start()

    @property
    def dead(self) -> bool:
        return not self.worker.is_alive()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue  # its client left while it waited
            self.progress.begin()
            try:
                gen = torch.Generator(device=self.model.device).manual_seed(job.sampling.seed)
                for index in range(job.sampling.n):
                    for delta, finish, count in self._stream_one(job, gen):
                        job.put((index, delta, finish, count))
            except Exception as e:  # noqa: BLE001 - handed to the request; the worker lives on
                job.put(e)
            finally:
                self.progress.end()
            job.put(None)

    @torch.no_grad()
    def _tokens(self, ids: list[int], s: Sampling, gen, cancelled: threading.Event) -> Iterator[int]:
        device = self.model.device
        out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        for _ in range(s.max_tokens):
            if cancelled.is_set():
                return
            token = int(next_tokens(out.logits[:, -1].float(), s, gen)[0])
            self.progress.token()
            yield token
            out = self.model(input_ids=torch.tensor([[token]], device=device),
                             past_key_values=out.past_key_values, use_cache=True)

    def _stream_one(self, job: _Job, gen) -> Iterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, tokens so far); holds back text that may begin
        a stop string or end in half a character."""
        s = job.sampling
        tokens, sent, eos = [], 0, self.tokenizer.eos_token_id
        for token in self._tokens(job.ids, s, gen, job.cancelled):
            if token == eos and not s.ignore_eos:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.find(x) for x in s.stop if x in text]
            if hits:
                yield text[sent:min(hits)], "stop", len(tokens)
                return
            safe = len(text) - max([k for x in s.stop for k in range(1, len(x)) if text.endswith(x[:k])] or [0])
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > sent:
                yield text[sent:safe], None, len(tokens)
                sent = safe
        finish = "stop" if len(tokens) < s.max_tokens else "length"
        yield self.tokenizer.decode(tokens, skip_special_tokens=True)[sent:], finish, len(tokens)

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int]]:
        """(choice index, text delta, finish reason, tokens so far) for each of the n samples."""
        job = _Job(ids, s, asyncio.get_running_loop(), asyncio.Queue())
        self.jobs.put(job)
        try:
            while (item := await job.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # done, or the client is gone (this task cancelled): the worker stops
            job.cancelled.set()


class VLLMBackend(Backend):
    """vLLM's async engine: continuous batching of concurrent requests. A request whose client
    has gone is aborted by vLLM itself when its generate() is cancelled."""
    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from ..eval.engines import vllm_args
        from ..models import load_tokenizer
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**vllm_args(model, dtype, device, max_model_len)))
        self.tokenizer = load_tokenizer(model)  # the same ids the transformers backend would see
        self.context = self.engine.model_config.max_model_len
        self.progress = Progress()

    @property
    def dead(self) -> bool:
        return self.engine.errored

    def close(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - an engine that died has nothing left to stop
            pass

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int]]:
        from vllm.inputs import TokensPrompt
        sent: dict[int, int] = {}
        self.progress.begin()
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), vllm_sampling(s),
                                                  uuid.uuid4().hex):
                for o in out.outputs:  # cumulative text: hand on what is new
                    delta = o.text[sent.get(o.index, 0):]
                    sent[o.index] = len(o.text)
                    self.progress.token()
                    if delta or o.finish_reason:
                        yield o.index, delta, o.finish_reason, len(o.token_ids)
        finally:
            self.progress.end()


def engine_dead(e: BaseException) -> bool:
    """Whether a generation failed because the engine itself is gone (not the request)."""
    return type(e).__name__ == "EngineDeadError"


async def start_backend(model: str, engine: str = "auto", dtype: str = "float32", device: str = "auto",
                        max_model_len: int | None = None):
    """The backend `engine` asks for, checked with one generated token. vLLM's own output goes to
    a log file (laten_ray/eval/fallback.py); `vllm` that cannot run the model is EngineUnavailable
    naming the cause and the log; `auto` then falls back to transformers and `fallback` says why."""
    fallback = None
    if use_vllm(engine):
        log = EngineLog(log_path(None, "serve"))
        backend, when = None, "at start"
        try:
            with log.captured():
                backend = VLLMBackend(model, dtype, device, max_model_len)
            when = "at its one-token check"
            await backend.warm_up()
            return backend
        except Exception as e:  # noqa: BLE001 - vLLM fails in many ways; each is told in one line
            fallback = log.explain(e, when, model)
            if backend is not None:
                backend.close()
        if engine == "vllm":
            raise EngineUnavailable(fallback)
    backend = HFBackend(model, dtype, device, max_model_len)
    await backend.warm_up()
    backend.fallback = fallback
    return backend
