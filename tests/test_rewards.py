"""The one answer extractor and the trajectory reward, table-driven."""

import json

import pytest

from app.rewards import (RewardWeights, answers_match, check_equations, extract_answer, normalize_number,
                         reasoning_quality, score_trajectory)
from tests.conftest import SHARED_GSM8K

EXTRACT_CASES = [
    # (text, strict, flexible)
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72", "72"),
    ("#### 1,250", "1250", "1250"),
    ("#### $18", "18", "18"),
    ("####-5", "-5", "-5"),
    ("#### 3.50", "3.5", "3.5"),
    ("#### 7.00", "7", "7"),
    ("first #### 3 then corrected #### 4", "4", "4"),
    ("So she earned $1,250.00 in total. The answer is $1,250.", None, "1250"),
    ("The answer is: 42.", None, "42"),
    ("Final answer: \\boxed{17}", None, "17"),
    ("She has 5 + 3 = 8 apples", None, "8"),
    ("no numbers at all", None, None),
    ("", None, None),
    ("#### five", None, None),
    ("The total is 12 dollars <<3*4=12>>.", None, "12"),
]


@pytest.mark.parametrize("text,strict,flexible", EXTRACT_CASES)
def test_extract_answer(text, strict, flexible):
    assert extract_answer(text, method="strict") == strict
    assert extract_answer(text) == flexible


def test_extract_answer_rejects_unknown_method():
    with pytest.raises(ValueError):
        extract_answer("#### 1", method="loose")


@pytest.mark.parametrize("raw,normalized", [("1,000", "1000"), ("$5", "5"), ("5.", "5"), ("-0.50", "-0.5"),
                                            ("abc", None), ("-", None), ("1e400", None)])
def test_normalize_number(raw, normalized):
    assert normalize_number(raw) == normalized


@pytest.mark.parametrize("pred,gold,match", [("18", "18", True), ("18.0", "18", True), ("17", "18", False),
                                             (None, "18", False), ("0.333333", "0.333333", True)])
def test_answers_match(pred, gold, match):
    assert answers_match(pred, gold) is match


@pytest.mark.skipif(not (SHARED_GSM8K / "train.jsonl").exists(), reason="shared GSM8K copy not present")
@pytest.mark.parametrize("split", ["train", "test"])
def test_extractor_returns_gold_for_every_real_gsm8k_row(split):
    rows = [json.loads(line) for line in (SHARED_GSM8K / f"{split}.jsonl").read_text().splitlines()]
    assert len(rows) > 1000
    wrong = [(i, r["answer"][-40:]) for i, r in enumerate(rows)
             if extract_answer(r["answer"]) != normalize_number(r["answer"].split("####")[-1])]
    assert wrong == []


@pytest.mark.parametrize("text,total,right", [
    ("48/2 = 24\n48+24 = 72", 2, 2),
    ("3 * 4 = 13", 1, 0),
    ("0.2 x 50 = 10 and $12 / 60 = $0.2", 2, 2),
    ("12/0 = 5", 1, 0),
    ("no equations here", 0, 0),
    ("with calculator <<48/2=24>>24 only", 0, 0),
])
def test_check_equations(text, total, right):
    assert check_equations(text) == (total, right)


def test_quality_prefers_right_equations_and_steps():
    good = "She has 5 + 3 = 8 apples.\nThen 8 * 2 = 16.\n#### 16"
    wrong_math = "She has 5 + 3 = 9 apples.\nThen 9 * 2 = 18.\n#### 16"
    bare = "#### 16"
    assert reasoning_quality(good) == 1.0
    assert reasoning_quality(good) > reasoning_quality(wrong_math) > reasoning_quality(bare) == 0.0


def test_score_trajectory_composite_reward():
    weights = RewardWeights(quality=0.5, length=0.2, target_tokens=100)
    good = score_trajectory("5 + 3 = 8\n8 * 2 = 16\n#### 16", "16", num_tokens=50, max_tokens=300, weights=weights)
    assert good.correct and good.reward == pytest.approx(1.5)
    long = score_trajectory("5 + 3 = 8\n8 * 2 = 16\n#### 16", "16", num_tokens=300, max_tokens=300, weights=weights)
    assert long.length_penalty == 1.0 and long.reward == pytest.approx(1.3)
    wrong = score_trajectory("#### 15", "16", num_tokens=10, max_tokens=300, weights=weights)
    assert not wrong.correct and wrong.reward == 0.0


def test_truncated_trajectory_is_never_correct():
    score = score_trajectory("5 + 3 = 8\n8 * 2 = 16", "16", num_tokens=64, max_tokens=64, truncated=True)
    assert score.truncated and not score.correct and score.answer == "16"
