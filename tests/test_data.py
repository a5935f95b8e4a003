"""Reading the paper's chat `messages` jsonl, the prompt format, tokenization and padding."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from laten_ray.data import (DataError, Example, attribution_ids, attribution_text, chat_prompt,
                            lm_batch, lm_ids, read_examples)
from laten_ray.builtin.tiny import build_tokenizer

GSM_EXTRACT = Path("/work/shared/data/gsm/gsm_extract_split.jsonl")


def line(messages, **extra) -> str:
    return json.dumps({**extra, "messages": messages})


def qa(question="What is 2 + 3?", answer="2 + 3 = 5. So the answer is 5.") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write(tmp_path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return path


def example(answer: str, question: str = "What is 2 + 3?") -> Example:
    return Example(tuple(qa(question, answer)), id="t")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --- reading ----------------------------------------------------------------------------------

def test_reads_the_papers_line_format(tmp_path):
    path = write(tmp_path,
                 line(qa("Answer the following question.\n\nQuestion: Ada has 3 apples and gets "
                         "2 more. How many apples does Ada have now?",
                         "Answer: Ada has 3 + 2 = 5 apples. So the answer is 5."),
                      dataset="gsm", id="gsm_1"),
                 line(qa("Q2", "A2"), dataset="gsm", id="gsm_2"))
    examples = read_examples(path)
    assert [e.id for e in examples] == ["gsm_1", "gsm_2"]
    assert examples[0].messages[0] == {"role": "user", "content": "Answer the following question."
                                       "\n\nQuestion: Ada has 3 apples and gets 2 more. How many "
                                       "apples does Ada have now?"}
    assert examples[0].answer == "Answer: Ada has 3 + 2 = 5 apples. So the answer is 5."
    assert examples[1].answer == "A2"


def test_id_defaults_to_empty_and_limit_stops_early(tmp_path):
    path = write(tmp_path, *[line(qa(f"Q{i}", f"A{i}")) for i in range(5)])
    examples = read_examples(path, limit=2)
    assert [e.answer for e in examples] == ["A0", "A1"]
    assert examples[0].id == ""


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write(tmp_path, line(qa()), "", "   ", line(qa("Q", "A")), "not json")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:5: not valid JSON"):
        read_examples(path)
    assert len(read_examples(path, limit=2)) == 2


def test_first_three_lines_of_the_real_gsm_file():
    if not GSM_EXTRACT.is_file():
        pytest.skip(f"{GSM_EXTRACT} not present")
    examples = read_examples(GSM_EXTRACT, limit=3)
    assert len(examples) == 3
    for e in examples:
        assert e.id.startswith("gsm_")
        assert [m["role"] for m in e.messages] == ["user", "assistant"]
        assert "answer is" in e.answer


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "not valid JSON"),
    ('{"messages": [}', "not valid JSON"),
    (json.dumps({"id": "x", "text": "hi"}), "no 'messages' key"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"messages": "hello"}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": ["hello"]}), r"messages\[0\] needs string 'role' and 'content'"),
    (line([{"role": "user", "content": "Q"}, {"role": "assistant"}]),
     r"messages\[1\] needs string 'role' and 'content'"),
    (line([{"role": "user", "content": 7}, {"role": "assistant", "content": "A"}]),
     r"messages\[0\] needs string 'role' and 'content'"),
    (line([{"role": None, "content": "Q"}, {"role": "assistant", "content": "A"}]),
     r"messages\[0\] needs string 'role' and 'content'"),
    (line(qa(answer="")), "empty answer"),
    (line(qa(answer="   \n")), "empty answer"),
    (line(qa(answer=" . ")), "empty answer"),
    (line(qa(answer='.")')), "empty answer"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, problem):
    path = write(tmp_path, line(qa()), "", bad, line(qa()))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: {problem}"):
        read_examples(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"data file '{re.escape(str(path))}' not found"):
        read_examples(path)


def test_file_with_only_blank_lines(tmp_path):
    path = write(tmp_path, "", "  ")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: no examples"):
        read_examples(path)


# --- prompt and attribution text --------------------------------------------------------------

def test_chat_prompt_format():
    messages = [{"role": "system", "content": "  Be brief. \n"},
                {"role": "user", "content": "\nWhat is 2 + 3?  "},
                {"role": "assistant", "content": "5"}]
    assert chat_prompt(messages) == ("<|system|>\nBe brief.\n\n"
                                     "<|user|>\nWhat is 2 + 3?\n\n"
                                     "<|assistant|>\n")


def test_chat_prompt_of_a_single_message_is_just_the_assistant_tag():
    assert chat_prompt([{"role": "assistant", "content": "5"}]) == "<|assistant|>\n"


@pytest.mark.parametrize("answer, kept", [
    ("So the answer is 42.\n", "So the answer is 42"),
    ('He said "yes").', 'He said "yes'),
    ("  [1, 2],]  ", "[1, 2"),
    ("no punctuation", "no punctuation"),
])
def test_attribution_text_strips_trailing_punctuation(answer, kept):
    e = example(answer)
    assert attribution_text(e) == "<|user|>\nWhat is 2 + 3?\n\n<|assistant|>\n" + kept


def _with_template(tok, single: str):
    """The tiny tokenizer with another post-processor: what other families add around a text."""
    from tokenizers import processors
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in ("<s>", "</s>")])
    return tok


def test_attribution_ids_are_what_encode_gives_split_at_the_last(tok):
    """As the paper's code, `tokenizer.encode(text)`: a Llama tokenizer's BOS first; nothing
    before the text for a Qwen2-like tokenizer (no BOS); an EOS a tokenizer adds at the end is
    left out, so the attributed token is the answer's last."""
    e = example("So the answer is 42.\n")
    text = tok(attribution_text(e), add_special_tokens=False)["input_ids"]
    ids, w = attribution_ids(tok, e)  # Llama-like: "<s> $A"
    assert ids == [tok.bos_token_id] + text[:-1] and w == text[-1]
    assert ids == tok.encode(attribution_text(e))[:-1]
    assert tok.decode(ids + [w], skip_special_tokens=True).endswith("42")

    qwen = _with_template(build_tokenizer(), "$A")
    assert attribution_ids(qwen, e) == (text[:-1], text[-1])
    with_eos = _with_template(build_tokenizer(), "<s> $A </s>")
    assert attribution_ids(with_eos, e) == ([tok.bos_token_id] + text[:-1], text[-1])


# --- LM examples and batches ------------------------------------------------------------------

def test_lm_ids_mask_the_prompt(tok):
    e = example("So the answer is 5.")
    prompt = tok(chat_prompt(e.messages))["input_ids"]
    answer = tok("So the answer is 5.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels = lm_ids(tok, e, max_length=1024)
    assert prompt[0] == tok.bos_token_id
    assert ids == prompt + answer
    assert labels == [-100] * len(prompt) + answer
    assert ids[-1] == labels[-1] == tok.eos_token_id


def test_lm_ids_train_on_inputs_labels_everything(tok):
    ids, labels = lm_ids(tok, example("So the answer is 5."), 1024, train_on_inputs=True)
    assert labels == ids


def test_lm_ids_answer_is_stripped(tok):
    assert lm_ids(tok, example("  5 \n"), 1024) == lm_ids(tok, example("5"), 1024)


def test_lm_ids_truncate_at_max_length(tok):
    e = example("So the answer is 5.")
    full_ids, full_labels = lm_ids(tok, e, 1024)
    ids, labels = lm_ids(tok, e, 7)
    assert ids == full_ids[:7] and labels == full_labels[:7]
    ids, labels = lm_ids(tok, e, len(full_ids) - 2, train_on_inputs=True)
    assert ids == labels == full_ids[:-2]


def test_lm_batch_pads_to_the_longest_row_only(tok):
    short = example("5", question="Hi?")
    long = example("So the answer is 2 + 3 = 5.", question="What is two plus three, please?")
    rows = [lm_ids(tok, e, 1024) for e in (short, long)]
    n_short, n_long = len(rows[0][0]), len(rows[1][0])
    assert n_short < n_long

    batch = lm_batch(tok, [short, long], max_length=1024)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, n_long)
    assert batch["attention_mask"].shape == (2, n_long)
    assert batch["input_ids"][1].tolist() == rows[1][0]
    assert batch["labels"][1].tolist() == rows[1][1]
    assert batch["attention_mask"][1].tolist() == [1] * n_long
    assert batch["input_ids"][0, :n_short].tolist() == rows[0][0]
    assert batch["input_ids"][0, n_short:].tolist() == [tok.pad_token_id] * (n_long - n_short)
    assert batch["labels"][0].tolist() == rows[0][1] + [-100] * (n_long - n_short)
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)


def test_lm_batch_respects_max_length(tok):
    batch = lm_batch(tok, [example("So the answer is 5."), example("7")], max_length=6,
                     train_on_inputs=True)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 6]
    assert batch["labels"].tolist() == batch["input_ids"].tolist()


def test_bad_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    path.write_bytes(good.encode() + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        read_examples(path)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_refused(tmp_path, limit):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(DataError, match="limit must be at least 1"):
        read_examples(path, limit=limit)
