"""The paper's 0-shot prompts, and the public column layouts of GSM8K, MMLU, HumanEval and MBPP
(as in their jsonl files and on the hub: openai/gsm8k, cais/mmlu, openai/openai_humaneval,
google-research-datasets/mbpp full and sanitized) turned into the paper's chat `messages`.
Training reads messages; evaluation (laten_ray/eval/tasks.py) builds its items from the same
prompts, so a model is asked in the format it was trained on."""
from __future__ import annotations

import re

LETTERS = "ABCD"
CODE_PROMPT = "Complete the following python function.\n\n\n"
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, <<48/2=24>>


class LayoutError(ValueError):
    """A record that has a known layout's keys but bad values."""


def gsm8k_prompt(question: str) -> str:
    return f"Answer the following question.\n\nQuestion: {question}"


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
            f"\n\n{question}\n{options}\nAnswer:")


def mbpp_signature(code: str) -> str:
    """The reference's first `def` line without its colon: the header the model completes."""
    return next((line.rstrip(":\r ") for line in code.splitlines() if line.lstrip().startswith("def ")), "")


def layout_of(record: dict) -> str | None:
    """gsm8k | mmlu | humaneval | mbpp | mbpp-sanitized, from the record's keys; None if unknown."""
    keys = set(record)
    if {"subject", "question", "choices", "answer"} <= keys:
        return "mmlu"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"task_id", "prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"text", "code", "test_list"} <= keys:
        return "mbpp"
    if {"prompt", "code", "test_list", "test_imports"} <= keys:
        return "mbpp-sanitized"
    return None


def mbpp_full(record: dict) -> dict:
    """The sanitized MBPP layout (prompt, test_imports) in the full layout's keys (text, test_setup_code)."""
    if layout_of(record) != "mbpp-sanitized":
        return record
    return {**record, "text": record["prompt"], "test_setup_code": "\n".join(record["test_imports"])}


def gsm8k_final(answer: str) -> str:
    """The number after '####' of a GSM8K answer, as written."""
    if "####" not in answer:
        raise LayoutError("answer has no '#### N' final line")
    return answer.rsplit("####", 1)[1].strip()


def messages_of(record: dict) -> list[dict] | None:
    """A public-layout record as the paper's (user, assistant) messages; None if no known layout.
    Answers take the style of the paper's files: GSM8K 'Answer: ... So the answer is N.'
    (calculator annotations dropped), MMLU 'The answer is: B', code 'Here is the completed
    function:' and the reference solution."""
    layout = layout_of(record)
    if layout is None:
        return None
    if layout == "gsm8k":
        steps = _CALCULATOR.sub("", record["answer"].rsplit("####", 1)[0]).split("\n")
        rationale = " ".join(s.strip() for s in steps if s.strip())
        user = gsm8k_prompt(record["question"])
        answer = f"Answer: {rationale} So the answer is {gsm8k_final(record['answer'])}."
    elif layout == "mmlu":
        if len(record["choices"]) != 4 or record["answer"] not in range(4):
            raise LayoutError("expected 4 choices and an answer index 0-3")
        user = mmlu_prompt(record["subject"], record["question"], record["choices"])
        answer = f"The answer is: {LETTERS[record['answer']]}"
    elif layout == "humaneval":
        user = CODE_PROMPT + record["prompt"]
        answer = f"Here is the completed function:\n\n\n```python\n{record['prompt']}{record.get('canonical_solution', '')}"
    else:
        r = mbpp_full(record)
        user = f"{CODE_PROMPT}{r['text']}\n{mbpp_signature(r['code'])}"
        answer = f"Here is the completed function:\n\n\n```python\n{r['code']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
