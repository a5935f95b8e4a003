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


def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_block(question: str, choices: list[str]) -> str:
    """One question with its options, ending in 'Answer:' (lm-evaluation-harness's layout)."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n{options}\nAnswer:"


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    return mmlu_header(subject) + mmlu_block(question, choices)


# The eight chain-of-thought exemplars of Wei et al. (2022) that GSM8K 8-shot evaluations use,
# with answers in the style of the paper's data ('So the answer is N.').
GSM8K_EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating "
     "35, they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
     "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
     "have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9.", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
     "golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
     "more, he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8.", "8"),
]


def gsm8k_few_shot(question: str, shots: int) -> str:
    """The k-shot chain-of-thought prompt (open-instruct's layout): exemplars as Question/Answer
    pairs, then the question."""
    demos = "".join(f"Question: {q}\nAnswer: {cot} So the answer is {a}.\n\n" for q, cot, a in GSM8K_EXEMPLARS[:shots])
    return f"Answer the following questions.\n\n{demos}Question: {question}"


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
    if not isinstance(answer, str) or "####" not in answer:
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
