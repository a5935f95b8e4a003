"""Generation backends of the server: vLLM's async engine (continuous batching), or
transformers one request at a time. Both stream (choice index, text delta, finish, tokens),
stop work for a client that has gone, and say whether they are dead or stuck."""
from __future__ import annotations

import asyncio
import copy
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from ..eval.engines import Sampling, generator, next_tokens, use_vllm, vllm_sampling
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


Entry = tuple[int, float | None, list[tuple[int, float]]]  # a token, its log-probability (None: a prompt's
                                                           # first token), the top (token, log-prob)s


def entry(logp: torch.Tensor, token: int, top: int) -> Entry:
    """One position's log-probabilities [V] (the model's own distribution, before sampling
    controls, as vLLM's default raw log-probs) as an Entry with the `top` likeliest."""
    values, ids = logp.topk(top) if top else (logp[:0], logp[:0].long())
    return token, float(logp[token]), list(zip(ids.tolist(), values.tolist()))


class Backend:
    """What both engines share: the tokenizer's ids, and the first token generated at start.
    `stream` yields (choice index, text delta, finish reason or None, tokens so far, the new
    tokens' log-probability entries: empty unless Sampling.logprobs asks)."""
    name: str
    tokenizer = None
    fallback: str | None = None  # why vLLM was not used, when `auto` fell back

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids, with a tokenizer of the calling thread's own: a fast tokenizer shared by
        threads can fail ("Already borrowed"), and the server tokenizes on a pool."""
        local = self.__dict__.setdefault("_local", threading.local())
        if not hasattr(local, "tokenizer"):
            local.tokenizer = copy.deepcopy(self.tokenizer)
        return local.tokenizer(text, add_special_tokens=special)["input_ids"]

    def vocabulary(self, vocab: int) -> None:
        """The model's vocabulary size, and the most characters one token spells (the longest
        token string bounds its text): a text longer than context x that is refused untokenized."""
        self.vocab = vocab
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self.max_token_chars = max(len(p) for p in pieces if p is not None)

    def queue_full(self, most: int) -> bool:
        """Whether `most` requests already wait for this engine (vLLM queues its own: never)."""
        return False

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
        self.vocabulary(self.model.config.vocab_size)
        self.progress = Progress()
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="laten-hf-engine", daemon=True)
        self.worker.start()

    @property
    def dead(self) -> bool:
        return not self.worker.is_alive()

    def queue_full(self, most: int) -> bool:
        return self.jobs.qsize() >= most

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue  # its client left while it waited
            self.progress.begin()
            try:
                gen = generator(job.sampling.seed, self.model.device)
                for index in range(job.sampling.n):
                    for delta, finish, count, entries in self._stream_one(job, gen):
                        job.put((index, delta, finish, count, entries))
            except Exception as e:  # noqa: BLE001 - handed to the request; the worker lives on
                job.put(e)
            finally:
                self.progress.end()
            job.put(None)

    @torch.no_grad()
    def _tokens(self, ids: list[int], s: Sampling, gen, cancelled: threading.Event) -> Iterator[tuple[int, Entry | None]]:
        device = self.model.device
        prompt = torch.tensor([ids], device=device)                 # [1, T]
        output = torch.empty(1, 0, dtype=torch.long, device=device)  # [1, t]: the penalties' history
        out = self.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        for _ in range(s.max_tokens):
            if cancelled.is_set():
                return
            logits = out.logits[:, -1].float()                     # [1, V]
            token = int(next_tokens(logits, s, gen, prompt, output)[0])
            output = torch.cat([output, torch.tensor([[token]], device=device)], 1)
            self.progress.token()
            yield token, None if s.logprobs is None else entry(logits[0].log_softmax(-1), token, s.logprobs)
            out = self.model(input_ids=torch.tensor([[token]], device=device),
                             past_key_values=out.past_key_values, use_cache=True)

    async def prompt_logprobs(self, ids: list[int], top: int) -> list[Entry]:
        """Each prompt token's log-probability given the tokens before it (None for the first):
        what `echo` with `logprobs` returns. One forward pass on a thread of its own."""
        return await asyncio.to_thread(self._prompt_logprobs, ids, top)

    @torch.no_grad()
    def _prompt_logprobs(self, ids: list[int], top: int) -> list[Entry]:
        logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0].float()  # [T, V]
        logp = logits.log_softmax(-1)
        return [(ids[0], None, [])] + [entry(logp[t - 1], ids[t], top) for t in range(1, len(ids))]

    def _stream_one(self, job: _Job, gen) -> Iterator[tuple[str, str | None, int, list]]:
        """(text delta, finish reason or None, tokens so far, new log-prob entries); holds back
        text that may begin a stop string or end in half a character."""
        s = job.sampling
        tokens, sent, eos, entries = [], 0, self.tokenizer.eos_token_id, []
        for token, logprob in self._tokens(job.ids, s, gen, job.cancelled):
            if token == eos and not s.ignore_eos:
                break
            tokens.append(token)
            if logprob is not None:
                entries.append(logprob)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.find(x) for x in s.stop if x in text]
            if hits:
                yield text[sent:min(hits)], "stop", len(tokens), entries
                return
            safe = len(text) - max([k for x in s.stop for k in range(1, len(x)) if text.endswith(x[:k])] or [0])
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > sent:
                yield text[sent:safe], None, len(tokens), entries
                sent, entries = safe, []
        finish = "stop" if len(tokens) < s.max_tokens else "length"
        yield self.tokenizer.decode(tokens, skip_special_tokens=True)[sent:], finish, len(tokens), entries

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int, list]]:
        """(choice index, text delta, finish reason, tokens so far, new log-prob entries) for each
        of the n samples."""
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
        self.vocabulary(self.engine.model_config.get_vocab_size())
        self.progress = Progress()

    @property
    def dead(self) -> bool:
        return self.engine.errored

    def close(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - an engine that died has nothing left to stop
            pass

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int, list]]:
        from vllm.inputs import TokensPrompt
        sent: dict[int, int] = {}
        logged: dict[int, int] = {}
        self.progress.begin()
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), vllm_sampling(s),
                                                  uuid.uuid4().hex):
                for o in out.outputs:  # cumulative text and log-probs: hand on what is new
                    delta = o.text[sent.get(o.index, 0):]
                    sent[o.index] = len(o.text)
                    entries = []
                    if s.logprobs is not None and o.logprobs:
                        first = logged.get(o.index, 0)
                        entries = [vllm_entry(o.logprobs[t], o.token_ids[t], s.logprobs)
                                   for t in range(first, len(o.logprobs))]
                        logged[o.index] = len(o.logprobs)
                    self.progress.token()
                    if delta or o.finish_reason or entries:
                        yield o.index, delta, o.finish_reason, len(o.token_ids), entries
        finally:
            self.progress.end()

    async def prompt_logprobs(self, ids: list[int], top: int) -> list[Entry]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
        final = None
        async for final in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
            pass
        return [(ids[0], None, [])] + [vllm_entry(final.prompt_logprobs[t], ids[t], top) for t in range(1, len(ids))]


def vllm_entry(position: dict, token: int, top: int) -> Entry:
    """vLLM's log-probs of one position ({token id: Logprob}, the chosen one and the top ones) as
    an Entry."""
    ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:top]
    return token, float(position[token].logprob), [(t, float(lp.logprob)) for t, lp in ranked]


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
