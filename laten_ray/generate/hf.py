"""The transformers engine: one token-by-token decoding loop with a KV cache, used in batches by
evaluation (left-padded, each row stopping at EOS or a stop string) and one sequence at a time
by the server (a worker thread streaming its tokens). A fallback, not a throughput engine."""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from .base import Engine
from .sampling import Entry, Sampling, entry, generator, next_tokens
from .stops import StopScanner, cut_at_stop


@dataclass
class _Job:
    ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class HFEngine(Engine):
    name = "hf"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", batch_size: int = 16,
                 max_model_len: int | None = None):
        from ..models import load_model, load_tokenizer, pick_device
        super().__init__()
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, dtype, pick_device(device))
        self.batch_size = batch_size
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.context = min(limit, max_model_len) if limit and max_model_len else (limit or max_model_len)
        self.vocab = self.model.config.vocab_size
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.worker: threading.Thread | None = None  # the server's, started by its first stream

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], s: Sampling, gen,
               finished: list[bool]) -> Iterator[tuple[list[int | None], torch.Tensor]]:
        """Decodes a left-padded batch token by token. Per step: each row's new token (None
        for a row that has finished: at EOS unless ignore_eos, or when the caller set
        `finished[i]`, e.g. at a stop string) and the logits it was chosen from [B, V] (float32,
        the model's own, before sampling controls)."""
        tok, device = self.tokenizer, self.model.device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = None if s.ignore_eos else tok.eos_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)        # [B, T]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        prompt = ids.masked_fill(mask == 0, -1)                        # [B, T]: the penalties' history
        output = torch.empty(len(prompts), 0, dtype=torch.long, device=device)  # [B, t]
        done = torch.tensor(finished, device=device)
        for _ in range(s.max_tokens):
            logits = out.logits[:, -1].float()                         # [B, V]
            token = next_tokens(logits, s, gen, prompt, output)        # [B]
            ended = done | (token == eos) if eos is not None else done.clone()
            output = torch.cat([output, torch.where(done, -1, token)[:, None]], 1)
            self.progress.token()
            yield [None if e else t for e, t in zip(ended.tolist(), token.tolist())], logits
            done = ended | torch.tensor(finished, device=device)
            if done.all():
                return
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            position = position[:, -1:] + 1
            out = self.model(input_ids=torch.where(done, pad, token)[:, None], attention_mask=mask,
                             position_ids=position, past_key_values=out.past_key_values, use_cache=True)

    # --- evaluation: batches -------------------------------------------------------------------

    def generate_ids(self, prompts: list[list[int]], s: Sampling) -> list[list[str]]:
        """n texts per prompt, each before its first stop string, in batches of batch_size."""
        gen, out = generator(s.seed, self.model.device), []
        for first in range(0, len(prompts), self.batch_size):
            chunk = prompts[first:first + self.batch_size]
            texts: list[list[str]] = [[] for _ in chunk]
            for _ in range(s.n):
                for i, text in enumerate(self._texts(chunk, s, gen)):
                    texts[i].append(text)
            out.extend(texts)
        return out

    def _texts(self, prompts: list[list[int]], s: Sampling, gen) -> list[str]:
        rows = [StopScanner(self.tokenizer, s.stop) for _ in prompts]
        finished = [False] * len(prompts)
        for tokens, _ in self.decode(prompts, s, gen, finished):
            for i, token in enumerate(tokens):
                if token is not None and s.stop:
                    finished[i] = rows[i].push(token)[1]
                elif token is not None:
                    rows[i].tokens.append(token)  # no stop strings: nothing to decode until the end
        return [cut_at_stop(self.tokenizer.decode(r.tokens, skip_special_tokens=True), s.stop) for r in rows]

    @torch.no_grad()
    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log P(continuation | context) for each (context ids, continuation ids), in float32,
        one unpadded forward per context when its continuations are single tokens (MMLU's
        letters), else one per pair."""
        out: list[float] = [0.0] * len(pairs)
        by_context: dict[tuple, list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            by_context.setdefault(tuple(context), []).append(i)
        for context, members in by_context.items():
            if all(len(pairs[i][1]) == 1 for i in members):
                ids = torch.tensor([list(context)], device=self.model.device)
                logp = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)  # [V]
                for i in members:
                    out[i] = logp[pairs[i][1][0]].item()
                continue
            for i in members:
                cont = pairs[i][1]
                ids = torch.tensor([list(context) + cont], device=self.model.device)
                logits = self.model(input_ids=ids).logits[0, len(context) - 1:-1].float()  # [C, V]
                out[i] = logits.log_softmax(-1).gather(1, torch.tensor(cont, device=logits.device)[:, None]).sum().item()
        return out

    # --- the server: one sequence at a time, streamed ------------------------------------------

    @property
    def dead(self) -> bool:
        return self.worker is not None and not self.worker.is_alive()

    def queue_full(self, most: int) -> bool:
        return self.jobs.qsize() >= most

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int, list]]:
        """(choice index, text delta, finish reason or None, tokens so far, the new tokens'
        log-prob entries: empty unless Sampling.logprobs asks) for each of the n samples. A
        request whose client has gone is skipped, or stopped at its next token."""
        if self.worker is None:
            self.worker = threading.Thread(target=self._work, name="laten-hf-engine", daemon=True)
            self.worker.start()
        job = _Job(ids, s, asyncio.get_running_loop(), asyncio.Queue())
        self.jobs.put(job)
        try:
            while (item := await job.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # done, or the client is gone (this task cancelled): the worker stops
            job.cancelled.set()

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

    def _stream_one(self, job: _Job, gen) -> Iterator[tuple[str, str | None, int, list]]:
        """(text delta, finish reason or None, tokens so far, new log-prob entries)."""
        s, text = job.sampling, StopScanner(self.tokenizer, job.sampling.stop)
        count, entries = 0, []
        for tokens, logits in self.decode([job.ids], s, gen, [False]):
            if job.cancelled.is_set() or tokens[0] is None:  # the client left; EOS
                break
            count += 1
            if s.logprobs is not None:
                entries.append(entry(logits[0].log_softmax(-1), tokens[0], s.logprobs))
            delta, stopped = text.push(tokens[0])
            if stopped:
                yield delta, "stop", count, entries
                return
            if delta:
                yield delta, None, count, entries
                entries = []
        if not job.cancelled.is_set():
            yield text.rest(), "stop" if count < s.max_tokens else "length", count, entries

    async def prompt_logprobs(self, ids: list[int], top: int) -> list[Entry]:
        """Each prompt token's log-probability given the tokens before it (None for the first):
        what `echo` with `logprobs` returns. One forward pass on a thread of its own."""
        return await asyncio.to_thread(self._prompt_logprobs, ids, top)

    @torch.no_grad()
    def _prompt_logprobs(self, ids: list[int], top: int) -> list[Entry]:
        logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0].float()  # [T, V]
        logp = logits.log_softmax(-1)
        return [(ids[0], None, [])] + [entry(logp[t - 1], ids[t], top) for t in range(1, len(ids))]
