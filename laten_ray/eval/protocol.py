"""Evaluation protocols: how a task's item becomes the text a model sees (docs/method.md §8).

A protocol is the chat format, the number of shots and, for MMLU, the mode:
- format `laten`: the chat format LaTen trains with (`<|user|>\\n...\\n\\n<|assistant|>\\n`);
  `model`: the model's own chat template (`tokenizer.apply_chat_template`), what instruct
  models expect; `plain`: the text alone, as lm-evaluation-harness prompts base models.
- shots: MMLU takes the first k dev questions of the item's subject (lm-evaluation-harness and
  open-instruct do the same); GSM8K the first k of the eight chain-of-thought exemplars. Shots
  that do not fit the model's context are dropped from the end, as open-instruct does.
- mode (MMLU): `choice`, the letter A-D with the highest log-likelihood as the continuation of
  the prompt (lm-evaluation-harness's `acc`); `generate`, the letter in a generated answer.

What differs between tasks (shots and how they are written, plain stops, modes, the choices and
what precedes them) is a fact of the task's entry in tasks.py; this module only reads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data import chat_prompt
from .tasks import MODES, get_task

FORMATS = ("laten", "model", "plain")
TURN_STOPS = ["<|user|>", "<|assistant|>", "<|system|>"]


@dataclass(frozen=True)
class Protocol:
    format: str = "laten"
    shots: int = 0
    mode: str = "generate"

    def check(self, task: str) -> "Protocol":
        t = get_task(task)
        if self.format not in FORMATS:
            raise ValueError(f"chat_format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.mode not in MODES or self.mode not in t.modes:
            takes = " or ".join(t.modes) if len(t.modes) > 1 else f"{t.modes[0]} only"
            raise ValueError(f"mode: {self.mode!r} is not available for {task} ({takes})")
        if not 0 <= self.shots <= t.max_shots:
            raise ValueError(f"shots: {task} takes 0 to {t.max_shots} shots, got {self.shots}")
        return self

    @property
    def special_tokens(self) -> bool:
        """Whether encoding adds the tokenizer's special tokens: not where a chat template wrote them."""
        return self.format != "model"

    def as_dict(self) -> dict:
        return asdict(self)



def prompt_text(user: str) -> str:
    """The chat prompt of the paper's data (the format LaTen trains on) for one user message."""
    return chat_prompt([{"role": "user", "content": user}, {"role": "assistant", "content": ""}])

def default_protocol(task: str, fields: dict) -> Protocol:
    """The protocol that evaluation settings ask for; the mode defaults to the task's first
    (MMLU: choice)."""
    mode = fields.get("mode") or get_task(task).modes[0]
    return Protocol(fields.get("chat_format") or "laten", int(fields.get("shots") or 0), mode).check(task)


def user_text(task: str, item, shots: list) -> str:
    """The user's message with `shots` in front, as the task writes them."""
    return get_task(task).user_text(item, shots)


def render(user: str, fmt: str, tokenizer, task: str, choice: bool) -> str:
    """The full prompt text in a chat format; in choice mode it ends where the answer follows."""
    if fmt == "plain":
        return get_task(task).plain_text(user)
    if fmt == "laten":
        text = prompt_text(user)
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_format: model, but this model's tokenizer has no chat template; "
                             "use --chat-format laten or plain")
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
    return text + (get_task(task).choice_prefix if choice else "")


def stops(task: str, fmt: str) -> list[str]:
    return list(TURN_STOPS) if fmt == "laten" else list(get_task(task).plain_stops) if fmt == "plain" else []


def choices(task: str) -> list[str]:
    """Choice mode's continuations, each after the prompt's last character (MMLU: ' A' ... ' D')."""
    return [f" {answer}" for answer in get_task(task).choices]
