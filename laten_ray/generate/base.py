"""What every engine shares: token ids from the model's own tokenizer (the same ids whichever
engine runs), the context and vocabulary limits the server checks, and the progress clock the
server's health check reads."""
from __future__ import annotations

import copy
import threading
import time

from .sampling import Sampling


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


class Engine:
    """An engine: `name`, `tokenizer`, `context` (the longest sequence it runs), `vocab`, and
    `fallback` (why vLLM was not used, when `auto` fell back). Batch engines add
    generate_ids and loglikelihoods; streaming ones stream and prompt_logprobs."""
    name: str
    tokenizer = None
    context: int | None = None
    vocab: int = 0
    fallback: str | None = None

    def __init__(self) -> None:
        self.progress = Progress()

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids, with a tokenizer of the calling thread's own: a fast tokenizer shared by
        threads can fail ("Already borrowed"), and the server tokenizes on a pool."""
        local = self.__dict__.setdefault("_local", threading.local())
        if not hasattr(local, "tokenizer"):
            local.tokenizer = copy.deepcopy(self.tokenizer)
        return local.tokenizer(text, add_special_tokens=special)["input_ids"]

    @property
    def max_token_chars(self) -> int:
        """The most characters one token spells: a text longer than context x this is refused
        untokenized."""
        if "_max_token_chars" not in self.__dict__:
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._max_token_chars = max(len(p) for p in pieces if p is not None)
        return self._max_token_chars

    def queue_full(self, most: int) -> bool:
        """Whether `most` requests already wait for this engine (vLLM queues its own: never)."""
        return False

    async def warm_up(self) -> None:
        """One token: some models load but fail at their first step (vLLM's CPU backend lacks
        some attention shapes), and that kills the engine."""
        async for _ in self.stream(self.encode("a")[:1] or [0], Sampling(max_tokens=1)):
            pass

    def close(self) -> None:
        """Stop the engine's processes now rather than at interpreter exit."""
