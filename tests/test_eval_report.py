"""Accuracy intervals, the Base -> SFT -> DPO report, and shard arithmetic."""

import pytest

from app.phases.eval import dataset_name, render_report, summarize, wilson_interval
from app.shards import shard_bounds, shard_slice


@pytest.mark.parametrize("correct,total,low,high", [(80, 100, 0.7112, 0.8666), (0, 10, 0.0, 0.2775),
                                                    (10, 10, 0.7225, 1.0), (0, 0, 0.0, 0.0)])
def test_wilson_interval(correct, total, low, high):
    got = wilson_interval(correct, total)
    assert got == pytest.approx((low, high), abs=1e-4)


def rows(pattern):
    return [{"correct": c == "1", "truncated": False} for c in pattern]


def test_report_shows_table_deltas_and_flips():
    records = {("gsm8k", "base"): rows("1100"), ("gsm8k", "sft"): rows("1110"), ("gsm8k", "dpo"): rows("0111")}
    summary = summarize(records)
    assert summary["results"]["gsm8k"]["sft"]["accuracy"] == 0.75
    report = render_report(summary, records, "r1")
    assert "| sft | 75.0% |" in report
    assert "+25.0 pts (1 fixed, 0 broken)" in report
    assert "+0.0 pts (1 fixed, 1 broken)" in report
    assert "Base 50.0% -> SFT 75.0% -> DPO 75.0%" in report


@pytest.mark.parametrize("spec,name", [("hf:openai/gsm8k", "gsm8k"), ("hf:madrylab/gsm8k-platinum", "gsm8k-platinum"),
                                       ("synthetic-test:200", "synthetic-test"), ("/data/my_test.jsonl", "my_test"),
                                       ("s3://b/p/test.jsonl", "test")])
def test_dataset_name(spec, name):
    assert dataset_name(spec) == name


@pytest.mark.parametrize("total,shards", [(10, 3), (3, 5), (1319, 8), (0, 2)])
def test_shards_cover_everything_in_order(total, shards):
    items = list(range(total))
    parts = [shard_slice(items, i, shards) for i in range(shards)]
    assert sum(parts, []) == items
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert shard_bounds(total, 0, shards)[0] == 0


# Exact McNemar p by hand: p = 2 * sum_{k <= min(f, b)} C(f + b, k) / 2^(f + b), capped at 1.
@pytest.mark.parametrize("fixed,broken,p", [
    (0, 0, 1.0),                        # nothing flipped: no evidence at all
    (1, 0, 1.0),                        # 2 * 1/2
    (5, 0, 0.0625),                     # 2 * 1/32
    (0, 5, 0.0625),                     # symmetric
    (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.03857
    (3, 3, 1.0),                        # 2 * 42/64 > 1
    (6, 1, 2 * (1 + 7) / 128),          # 0.125
    (9, 1, 2 * (1 + 10) / 1024),        # 0.02148
])
def test_mcnemar_exact_p_matches_hand_values(fixed, broken, p):
    from app.phases.eval import mcnemar_exact_p

    assert mcnemar_exact_p(fixed, broken) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_p_stays_finite_at_gsm8k_size():
    from app.phases.eval import mcnemar_exact_p

    p = mcnemar_exact_p(700, 600)  # 2^1300 does not fit a float; the integers do
    assert 0.0 < p < 0.01 and p == mcnemar_exact_p(600, 700)
    assert mcnemar_exact_p(660, 659) == 1.0


def test_paired_bootstrap_interval_matches_the_normal_approximation_and_is_seeded():
    from app.phases.eval import paired_bootstrap_interval

    # 1000 questions, 80 fixed, 20 broken: difference 0.06, paired SE sqrt((0.1 - 0.06^2) / 1000) = 0.00982
    low, high = paired_bootstrap_interval(80, 20, 1000)
    assert low == pytest.approx(0.06 - 1.96 * 0.00982, abs=0.002)
    assert high == pytest.approx(0.06 + 1.96 * 0.00982, abs=0.002)
    assert paired_bootstrap_interval(80, 20, 1000) == (low, high)  # fixed seed: the same numbers every run
    assert paired_bootstrap_interval(0, 0, 200) == (0.0, 0.0)
    assert paired_bootstrap_interval(0, 0, 0) == (0.0, 0.0)


@pytest.mark.parametrize("models,expected", [
    (["base", "sft", "dpo"], [("base", "sft"), ("sft", "dpo"), ("base", "dpo")]),
    (["base", "sft"], [("base", "sft")]),
    (["sft", "dpo"], [("sft", "dpo")]),
    (["base"], []),
])
def test_comparisons(models, expected):
    from app.phases.eval import comparisons

    assert comparisons(models) == expected


def id_rows(pattern):
    return [{"id": f"q{i}", "correct": c == "1", "truncated": False} for i, c in enumerate(pattern)]


def test_summary_and_report_carry_paired_statistics():
    records = {("gsm8k", "base"): id_rows("1100000000"), ("gsm8k", "sft"): id_rows("1111110000"),
               ("gsm8k", "dpo"): id_rows("0111111100")}
    summary = summarize(records)
    paired = summary["paired"]["gsm8k"]
    assert list(paired) == ["base->sft", "sft->dpo", "base->dpo"]
    assert paired["base->sft"] | {"ci95": None, "method": None} == {
        "before": "base", "after": "sft", "n": 10, "difference": 0.4, "ci95": None, "fixed": 4, "broken": 0,
        "mcnemar_p": 0.125, "method": None}
    assert paired["sft->dpo"]["fixed"] == 2 and paired["sft->dpo"]["broken"] == 1
    assert paired["sft->dpo"]["mcnemar_p"] == 1.0
    low, high = paired["base->sft"]["ci95"]
    assert 0 < low <= 0.4 <= high <= 0.8
    report = render_report(summary, records, "r1")
    assert "| base -> sft | +40.0 pts |" in report and "| 4 | 0 | 0.1250 |" in report


def test_paired_comparison_refuses_different_questions():
    from app.phases.eval import paired_comparison

    with pytest.raises(ValueError, match="same questions"):
        paired_comparison(id_rows("10"), id_rows("101"))
    shifted = [dict(r, id=f"x{i}") for i, r in enumerate(id_rows("10"))]
    with pytest.raises(ValueError, match="same order"):
        paired_comparison(id_rows("10"), shifted)
