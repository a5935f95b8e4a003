"""Generation backends of the server: vLLM's async engine (continuous batching), or
transformers one request at a time. Both stream (choice index, text delta, finish, tokens)."""
from __future__ import annotations

import asyncio
import threading
import uuid
from typing import AsyncIterator, Iterator

import torch

from ..eval.engines import Sampling, next_tokens, use_vllm, vllm_sampling


class HFBackend:
    """transformers, one sequence at a time under a lock (a fallback, not a throughput engine)."""
    name = "hf"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None):
        from ..models import load_model, load_tokenizer, pick_device
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, dtype, pick_device(device))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.context = min(self.context, max_model_len or self.context)
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def _tokens(self, ids: list[int], s: Sampling, gen) -> Iterator[int]:
        device = self.model.device
        out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        for _ in range(s.max_tokens):
            token = int(next_tokens(out.logits[:, -1].float(), s, gen)[0])
            yield token
            out = self.model(input_ids=torch.tensor([[token]], device=device),
                             past_key_values=out.past_key_values, use_cache=True)

    def _stream_one(self, ids: list[int], s: Sampling, gen) -> Iterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, tokens so far); holds back text that may begin
        a stop string or end in half a character."""
        tokens, sent, eos = [], 0, self.tokenizer.eos_token_id
        for token in self._tokens(ids, s, gen):
            if token == eos:
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
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                with self.lock:
                    gen = torch.Generator(device=self.model.device).manual_seed(s.seed)
                    for index in range(s.n):
                        for delta, finish, count in self._stream_one(ids, s, gen):
                            loop.call_soon_threadsafe(queue.put_nowait, (index, delta, finish, count))
            except BaseException as e:  # noqa: BLE001 - handed to the request
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        threading.Thread(target=work, daemon=True).start()
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


class VLLMBackend:
    """vLLM's async engine: continuous batching of concurrent requests."""
    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from ..eval.engines import vllm_args
        from ..models import load_tokenizer
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**vllm_args(model, dtype, device, max_model_len)))
        self.tokenizer = load_tokenizer(model)  # the same ids the transformers backend would see
        self.context = self.engine.model_config.max_model_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int]]:
        from vllm.inputs import TokensPrompt
        sent: dict[int, int] = {}
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), vllm_sampling(s),
                                              uuid.uuid4().hex):
            for o in out.outputs:  # cumulative text: hand on what is new
                delta = o.text[sent.get(o.index, 0):]
                sent[o.index] = len(o.text)
                if delta or o.finish_reason:
                    yield o.index, delta, o.finish_reason, len(o.token_ids)


def make_backend(model: str, engine: str = "auto", dtype: str = "float32", device: str = "auto", **kw):
    if use_vllm(engine):
        return VLLMBackend(model, dtype, device, **kw)
    return HFBackend(model, dtype, device, kw.get("max_model_len"))
