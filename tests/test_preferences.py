"""Preference pair construction rules, on hand-made rollouts."""

import json

import pytest

from app.errors import InputError
from app.phases.preferences import Config, build_pairs, describe, read_rollouts


def traj(text, correct, reward, truncated=False, answer="1", variant="direct"):
    return {"full_text": text, "correct": correct, "reward": reward, "truncated": truncated,
            "answer": answer, "num_tokens": 10, "variant": variant}


def record(qid, *trajectories):
    return {"id": qid, "question": f"question {qid}?", "gold": "1", "trajectories": list(trajectories)}


def config(**overrides):
    return Config(**{"quality_threshold": 0.2, "max_correctness_pairs_per_question": 4,
                     "max_quality_pairs_per_question": 2, **overrides})


def test_correctness_and_quality_pairs():
    records = [record("q1", traj("good a", True, 1.5), traj("good b", True, 1.1), traj("bad", False, 0.3))]
    pairs, summary = build_pairs(records, config())
    kinds = sorted(p["type"] for p in pairs)
    assert kinds == ["correctness", "correctness", "quality"]
    quality = next(p for p in pairs if p["type"] == "quality")
    assert (quality["chosen"], quality["rejected"], quality["margin"]) == ("good a", "good b", 0.4)
    assert summary["by_type"] == {"correctness": 2, "quality": 1}
    assert all(p["question_id"] == "q1" and p["prompt"].endswith("Let's think step by step.\n") for p in pairs)


def test_every_pair_prefers_higher_reward_and_differs_in_text():
    records = [record(f"q{i}", traj("a", True, 1.2), traj("a", True, 1.2), traj("b", True, 1.0),
                      traj("c", False, 0.4), traj("d", False, 0.1)) for i in range(5)]
    pairs, _ = build_pairs(records, config(quality_threshold=0.1))
    assert pairs
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert p["chosen_reward"] > p["rejected_reward"] and p["margin"] > 0


def test_threshold_blocks_small_quality_gaps_and_is_explained():
    records = [record("q1", traj("a", True, 1.2), traj("b", True, 1.1), traj("c", False, 0.0))]
    pairs, summary = build_pairs(records, config(quality_threshold=0.5))
    assert [p["type"] for p in pairs] == ["correctness", "correctness"]
    lines = describe(summary, config(quality_threshold=0.5))
    assert any("no quality pairs" in line and "0.1" in line for line in lines)


def test_caps_per_question():
    trajectories = [traj(f"right {i}", True, 1.0 + i / 10) for i in range(6)] + \
                   [traj(f"wrong {i}", False, 0.0) for i in range(6)]
    pairs, _ = build_pairs([record("q", *trajectories)], config(max_correctness_pairs_per_question=3,
                                                                max_quality_pairs_per_question=1,
                                                                quality_threshold=0.05))
    assert sum(p["type"] == "correctness" for p in pairs) == 3
    assert sum(p["type"] == "quality" for p in pairs) == 1


def test_truncated_and_unparseable_are_excluded_and_counted():
    records = [record("q", traj("right", True, 1.0), traj("cut", False, 0.5, truncated=True),
                      traj("rambling", False, 0.2, answer=None))]
    pairs, summary = build_pairs(records, config())
    assert pairs == []
    assert summary["excluded_trajectories"] == {"truncated": 1, "no_answer": 1}
    assert "only correct" in summary["why_no_pairs"]


def test_all_correct_or_all_wrong_questions_make_no_correctness_pairs():
    records = [record("q1", traj("a", True, 1.0), traj("b", True, 1.0)),
               record("q2", traj("c", False, 0.0), traj("d", False, 0.1))]
    pairs, summary = build_pairs(records, config())
    assert pairs == [] and summary["questions_all_correct"] == 1 and summary["questions_all_wrong"] == 1


def test_read_rollouts_names_bad_lines(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    good = record("q1", traj("a", True, 1.0))
    bad = record("q2", {"full_text": "x", "correct": "yes", "reward": 1.0, "num_tokens": 3})
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError, match=r"rollouts.jsonl:2: trajectory 0: field 'correct' has type str"):
        read_rollouts(path)
    path.write_text(json.dumps({"id": "q", "question": "?"}) + "\n")
    with pytest.raises(InputError, match=r":1: missing field 'trajectories'"):
        read_rollouts(path)
    path.write_text("")
    with pytest.raises(InputError, match="no rollouts"):
        read_rollouts(path)
