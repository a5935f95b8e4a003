"""Stop strings, the same way for every engine and front: the text ends before the first stop
string; while streaming, text that may be the beginning of one (or half a character) is held
back until the next token settles it."""
from __future__ import annotations


def cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


class StopScanner:
    """One sequence's text as its tokens arrive. `push` returns the text that can be handed on
    and whether a stop string has appeared (the text then ends before it)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters handed on
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped = True
            return self._take(text, min(hits)), True
        safe = len(text) - max([k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])] or [0])
        while safe > self.sent and text[safe - 1] == "\ufffd":  # part of a character: a later token completes it
            safe -= 1
        return self._take(text, safe), False

    def rest(self) -> str:
        """What was held back, at the end of the sequence (no stop string followed)."""
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.tokens, skip_special_tokens=True), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
