"""The paper's chat `messages` data: reading, prompt format, tokenization and padding."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Stripped from the end of an answer before its last token is attributed (DESIGN.md §1).
ATTRIBUTION_STRIP = '."),]\n '


class DataError(ValueError):
    """A bad data file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]  # each {"role": str, "content": str}; the last one is the answer
    id: str = ""

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read a jsonl file of {"messages": [{"role", "content"}, ...]} lines; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if limit is not None and limit < 1:
        raise DataError(f"{path}: limit must be at least 1, got {limit}")
    examples = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not valid UTF-8") from None
            if not line.strip():
                continue
            examples.append(_parse_line(line, f"{path}:{number}"))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: no 'messages' key")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs string 'role' and 'content'")
    if not messages[-1]["content"].strip(ATTRIBUTION_STRIP):
        raise DataError(f"{where}: empty answer (last message has no content)")
    return Example(tuple(messages), str(record.get("id", "")))


def chat_prompt(messages) -> str:
    """The prompt before the answer: every message but the last, then the assistant tag."""
    text = "".join(f"<|{m['role']}|>\n{m['content'].strip()}\n\n" for m in messages[:-1])
    return text + "<|assistant|>\n"


def attribution_text(example: Example) -> str:
    """Prompt + answer cut after its last meaningful token, whose log-probability is attributed."""
    return chat_prompt(example.messages) + example.answer.strip().rstrip(ATTRIBUTION_STRIP)


def attribution_ids(tokenizer, example: Example) -> tuple[list[int], int]:
    """(input ids, attributed token w): the tokens of the attribution text but the last, and the last."""
    ids = tokenizer(attribution_text(example), add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"example {example.id!r}: attribution text has fewer than 2 tokens")
    return ids[:-1], ids[-1]


def lm_ids(tokenizer, example: Example, max_length: int, train_on_inputs: bool = False
           ) -> tuple[list[int], list[int]]:
    """(input ids, labels) for the LM loss; labels are -100 on the prompt unless train_on_inputs."""
    prompt = tokenizer(chat_prompt(example.messages), add_special_tokens=True)["input_ids"]
    answer = tokenizer(example.answer.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = (prompt if train_on_inputs else [-100] * len(prompt)) + answer
    return ids, labels[:max_length]


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    """Pad to the longest row of this batch only (dynamic padding). [B, T]"""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def attribution_batch(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded inputs with the last real position T and the attributed token w of each row."""
    pairs = [attribution_ids(tokenizer, e) for e in examples]
    rows = [ids for ids, _ in pairs]
    return {
        "input_ids": pad_right(rows, pad_id(tokenizer)),                   # [B, T]
        "attention_mask": pad_right([[1] * len(r) for r in rows], 0),      # [B, T]
        "last": torch.tensor([len(r) - 1 for r in rows]),                  # [B]
        "target": torch.tensor([w for _, w in pairs]),                     # [B]
    }


def lm_batch(tokenizer, examples: list[Example], max_length: int, train_on_inputs: bool = False
             ) -> dict[str, torch.Tensor]:
    pairs = [lm_ids(tokenizer, e, max_length, train_on_inputs) for e in examples]
    return {
        "input_ids": pad_right([i for i, _ in pairs], pad_id(tokenizer)),     # [B, T]
        "attention_mask": pad_right([[1] * len(i) for i, _ in pairs], 0),     # [B, T]
        "labels": pad_right([lab for _, lab in pairs], -100),                 # [B, T]
    }


def load_examples(spec: str, limit: int | None = None) -> list[Example]:
    """Examples of a data spec: a jsonl path, or demo:SPLIT (the built-in demo data)."""
    if spec.startswith("demo:"):
        from . import demo
        from .models import cache_dir
        return read_examples(demo.write_split(spec[5:], cache_dir() / "demo"), limit)
    return read_examples(spec, limit)
