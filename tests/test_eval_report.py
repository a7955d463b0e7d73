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
