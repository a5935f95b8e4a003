"""Training examples: chat `messages` read from any data spec, the prompt format, tokenization
and padding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import LayoutError, messages_of
from .records import DataError, read_records

# Stripped from the end of an answer before its last token is attributed (docs/method.md §1).
ATTRIBUTION_STRIP = '."),]\n '


@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]  # each {"role": str, "content": str}; the last one is the answer
    id: str = ""

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


def read_examples(spec: str, limit: int | None = None) -> list[Example]:
    """The examples of a data spec (laten_ray/records.py): records with chat `messages`, or in a
    public layout of GSM8K, MMLU, HumanEval or MBPP (laten_ray/formats.py)."""
    examples = [_example(record, where) for where, record in read_records(spec, limit)]
    if not examples:
        raise DataError(f"{spec}: no examples")
    return examples


def _example(record: dict, where: str) -> Example:
    if "messages" not in record:
        try:
            messages = messages_of(record)
        except LayoutError as e:
            raise DataError(f"{where}: {e}") from None
        if messages is None:
            raise DataError(f"{where}: no 'messages' key, and not a GSM8K, MMLU, HumanEval or MBPP "
                            f"record (keys: {', '.join(record)})")
        record = {**record, "messages": messages}
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs string 'role' and 'content'")
    if not messages[-1]["content"].strip(ATTRIBUTION_STRIP):
        raise DataError(f"{where}: empty answer (last message has no content)")
    return Example(tuple(messages), str(record.get("id", record.get("task_id", ""))))


def chat_prompt(messages) -> str:
    """The prompt before the answer: every message but the last, then the assistant tag."""
    text = "".join(f"<|{m['role']}|>\n{m['content'].strip()}\n\n" for m in messages[:-1])
    return text + "<|assistant|>\n"


def attribution_text(example: Example) -> str:
    """Prompt + answer cut after its last meaningful token, whose log-probability is attributed."""
    return chat_prompt(example.messages) + example.answer.strip().rstrip(ATTRIBUTION_STRIP)


def attribution_ids(tokenizer, example: Example) -> tuple[list[int], int]:
    """(input ids, attributed token w): the tokens of the attribution text but the last, and the
    last. As the paper's code (`tokenizer.encode(text)`): with the special tokens the tokenizer
    puts first (Llama's BOS; none for Qwen2), as training's prompts have them; one it would put
    after the text (an EOS) is left out, so w is the answer's last token."""
    text = attribution_text(example)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = next((s for s in range(len(ids) - len(plain) + 1) if ids[s:s + len(plain)] == plain), None)
    if start is not None:
        ids = ids[:start + len(plain)]
    if len(ids) < 2 or not plain:
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
