"""Data specs: synthetic problems, JSONL with clear errors, reject accounting."""

import json
import re

import pytest

from app.data import load_problems, read_jsonl, synthetic_problems
from app.errors import ConfigError, InputError
from app.rewards import extract_answer


def test_synthetic_problems_are_gsm8k_format_and_self_consistent():
    rows = synthetic_problems(300, seed=3)
    assert len({r["question"] for r in rows}) == 300
    for row in rows:
        assert row["answer"].splitlines()[-1].startswith("#### ")
        gold = extract_answer(row["answer"], method="strict")
        assert gold is not None and int(gold) >= 0


def test_synthetic_train_and_test_never_share_a_question():
    train = {r["question"] for r in synthetic_problems(2000)}
    test = {r["question"] for r in synthetic_problems(400, stream="test")}
    assert not train & test


def test_synthetic_is_deterministic_per_seed():
    assert synthetic_problems(20, seed=1) == synthetic_problems(20, seed=1)
    assert synthetic_problems(20, seed=1) != synthetic_problems(20, seed=2)


def test_load_problems_from_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in synthetic_problems(5)) + "\n\n")
    problems, report = load_problems(str(path))
    assert len(problems) == 5 and report.rejected == 0
    assert problems[0].gold == extract_answer(problems[0].answer)
    assert problems[0].id == "syn-train-0"


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path, ['{"question": "q", "answer": "#### 1"}', '{"question": "q2", "answer": '])
    with pytest.raises(InputError, match=rf"{path}:2: malformed JSON"):
        load_problems(str(path))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _write(tmp_path, ['{"question": "q", "answer": "#### 1"}', '{"question": "q2"}'])
    with pytest.raises(InputError, match=rf"{path}:2: missing field 'answer'"):
        load_problems(str(path))


def test_mistyped_field_is_named(tmp_path):
    path = _write(tmp_path, ['{"question": "q", "answer": 5}'])
    with pytest.raises(InputError, match=r":1: field 'answer' must be a string, not int"):
        load_problems(str(path))


def test_non_object_line(tmp_path):
    path = _write(tmp_path, ['[1, 2]'])
    with pytest.raises(InputError, match=r":1: expected a JSON object"):
        read_jsonl(path)


def test_unparseable_gold_is_rejected_and_counted(tmp_path):
    good = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(99)]
    path = _write(tmp_path, good + [json.dumps({"question": "bad", "answer": "no number here"})])
    problems, report = load_problems(str(path), max_reject_rate=0.05)
    assert len(problems) == 99 and report.rejected == 1
    assert "gold answer does not parse x1" in report.line()


def test_reject_rate_over_the_limit_fails(tmp_path):
    lines = [json.dumps({"question": "q", "answer": "#### 1"}), json.dumps({"question": "q", "answer": "none"})]
    with pytest.raises(InputError, match="reject rate"):
        load_problems(str(_write(tmp_path, lines)), max_reject_rate=0.1)


def test_empty_dataset_fails(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(InputError, match="no usable rows"):
        load_problems(str(path))


def test_missing_file_and_bad_specs():
    with pytest.raises(InputError, match="no such file"):
        load_problems("/nonexistent/train.jsonl")
    with pytest.raises(ConfigError):
        load_problems("synthetic:zero")
    with pytest.raises(ConfigError):
        load_problems("")


def test_limit():
    problems, _ = load_problems("synthetic:50", limit=7)
    assert len(problems) == 7


def test_demo_synthetic_family_is_unchanged():
    """The demo's data, pinned: the README's table was measured on exactly these problems."""
    import hashlib

    rows = [synthetic_problems(1200, 0, "train"), synthetic_problems(200, 0, "test"),
            synthetic_problems(4000, 1000, "train"), synthetic_problems(300, 3, "test")]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "97681a6aef7d6f861a1492858fb115aca0f875cb600b0045f94887085369fe2a"


def _check_solution(answer: str) -> list[int]:
    """Every calculator annotation is right, each step starts from the previous result, and the
    last result is the gold answer; returns the numbers the solution used."""
    lines = answer.splitlines()
    results, used = [], []
    for line in lines[:-1]:
        a, op, b, c = re.search(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", line).groups()
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0), line
        results.append(c)
        used += [a, b]
    assert lines[-1] == f"#### {results[-1]}"
    return used


def test_synthetic_hard_is_harder_and_correct():
    from app.data import synthetic_hard_problems

    rows = synthetic_hard_problems(500, seed=3)
    steps = [len(r["answer"].splitlines()) - 1 for r in rows]
    assert min(steps) >= 2 and max(steps) >= 5  # 2-4 operations, a pack purchase takes two lines
    golds = [int(extract_answer(r["answer"], method="strict")) for r in rows]
    assert all(0 < g <= 2000 for g in golds) and sum(g >= 100 for g in golds) > 300  # most answers have 3-4 digits
    with_distractors = 0
    for row in rows:
        used = _check_solution(row["answer"])
        numbers = [int(n) for n in re.findall(r"\d+", row["question"])]
        with_distractors += any(n not in used for n in numbers)
    assert with_distractors > 250  # most questions mention numbers the answer must ignore


def test_synthetic_hard_splits_never_overlap_and_are_seeded():
    from app.data import synthetic_hard_problems

    split = {s: {r["question"] for r in synthetic_hard_problems(n, stream=s)}
             for s, n in (("train", 3000), ("val", 1000), ("test", 1000))}
    assert not split["train"] & split["val"] and not split["train"] & split["test"] and not split["val"] & split["test"]
    assert synthetic_hard_problems(20, seed=1) == synthetic_hard_problems(20, seed=1) != synthetic_hard_problems(20, seed=2)


@pytest.mark.parametrize("spec,split,prefix", [("synthetic-hard:10", "train", "syn-hard-train-"),
                                               ("synthetic-hard:10", "test", "syn-hard-test-"),
                                               ("synthetic-hard-val:10", "test", "syn-hard-val-"),
                                               ("synthetic-hard-test:10", "train", "syn-hard-test-")])
def test_synthetic_hard_specs(spec, split, prefix):
    problems, report = load_problems(spec, split=split)
    assert len(problems) == 10 and report.rejected == 0 and problems[0].id == prefix + "0"


def test_bad_synthetic_hard_spec():
    with pytest.raises(ConfigError, match="synthetic-hard-val:N"):
        load_problems("synthetic-hard-dev:10")
