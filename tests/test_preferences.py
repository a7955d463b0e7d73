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
    assert summary["by_type"] == {"correctness": 2, "quality": 1, "gold_anchored": 0}
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


SOLUTION = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"


def solved(qid, *trajectories):
    return {**record(qid, *trajectories), "gold": "7", "solution": SOLUTION}


def test_gold_anchored_pairs_where_no_sample_is_right():
    records = [solved("q1", traj("right", True, 1.0), traj("wrong", False, 0.1)),
               solved("q2", traj("wrong high", False, 0.4), traj("wrong low", False, 0.2),
                      traj("no answer", False, 0.0, answer=None)),
               solved("q3", traj("cut off", False, 0.0, truncated=True, answer=None))]
    pairs, summary = build_pairs(records, config(gold_anchored=True, max_gold_pairs_per_question=1))
    gold = {p["question_id"]: p for p in pairs if p["type"] == "gold_anchored"}
    assert set(gold) == {"q2", "q3"}  # q1 has a correct sample: a correctness pair instead
    assert gold["q2"]["chosen"] == "She has 3 + 4 = 7 apples.\n#### 7"  # as SFT taught it: no annotations
    assert gold["q2"]["rejected"] == "wrong low"  # parseable wrong answers first, lowest reward first
    assert gold["q3"]["rejected"] == "cut off"  # a truncated sample when nothing else is left
    assert gold["q2"]["chosen_variant"] == "reference" and gold["q2"]["chosen_reward"] is None
    assert gold["q2"]["prompt"].endswith("Let's think step by step.\n")
    assert summary["by_type"] == {"correctness": 1, "quality": 0, "gold_anchored": 2}
    assert summary["gold_anchored"]["rejected_by_kind"] == {"wrong_answer": 1, "no_answer": 0, "truncated": 1}
    assert summary["questions_without_correct"] == 2
    assert any("2 gold-anchored" in line for line in describe(summary, config(gold_anchored=True)))


def test_gold_anchored_cap_and_order_of_rejected_kinds():
    records = [solved("q", traj("w1", False, 0.3), traj("w2", False, 0.1), traj("n", False, 0.0, answer=None),
                      traj("t", False, 0.0, truncated=True), traj("t", False, 0.0, truncated=True))]
    pairs, _ = build_pairs(records, config(gold_anchored=True, max_gold_pairs_per_question=10))
    assert sorted(p["rejected"] for p in pairs) == ["n", "t", "w1", "w2"]  # distinct texts only
    pairs, _ = build_pairs(records, config(gold_anchored=True, max_gold_pairs_per_question=2))
    assert sorted(p["rejected"] for p in pairs) == ["w1", "w2"]  # parseable wrong answers before the rest
    pairs, _ = build_pairs(records, config(gold_anchored=True, max_gold_pairs_per_question=3))
    assert sorted(p["rejected"] for p in pairs) == ["n", "w1", "w2"]  # then no answer, then truncated


def test_without_gold_anchoring_all_wrong_questions_make_no_pairs_and_the_option_is_named():
    records = [solved("q", traj("w", False, 0.1), traj("t", False, 0.0, truncated=True))]
    pairs, summary = build_pairs(records, config())
    assert pairs == [] and summary["by_type"]["gold_anchored"] == 0
    assert "--gold-anchored" in summary["why_no_pairs"]


def test_gold_anchored_needs_the_reference_solution_in_the_rollouts(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text(json.dumps(solved("q1", traj("a", False, 0.0))) + "\n"
                    + json.dumps(record("q2", traj("b", False, 0.0))) + "\n")
    assert len(read_rollouts(path)) == 2  # not needed without the option
    with pytest.raises(InputError, match=r"rollouts.jsonl:2: missing field 'solution'.*rerun rollouts"):
        read_rollouts(path, need_solution=True)


def test_pair_variants_pairs_only_what_was_sampled_under_those_prompts():
    records = [record("q1", traj("d right", True, 1.2), traj("d wrong", False, 0.1),
                      traj("r right", True, 1.3, variant="reflective"), traj("r wrong", False, 0.0, variant="reflective"),
                      traj("p wrong", False, 0.2, variant="deliberative")),
               record("q2", traj("r only right", True, 1.0, variant="reflective"), traj("d only wrong", False, 0.0))]
    every, summary = build_pairs(records, config())
    assert summary["by_variant"] == {"chosen": {"direct": 1, "reflective": 3},
                                     "rejected": {"deliberative": 1, "direct": 2, "reflective": 1}}
    assert summary["pair_variants"] == "all" and summary["trajectories_of_other_variants"] == 0

    direct, summary = build_pairs(records, config(pair_variants=["direct"]))
    assert {p["chosen"] for p in direct} == {"d right"} and {p["rejected"] for p in direct} == {"d wrong"}
    assert {(p["chosen_variant"], p["rejected_variant"]) for p in direct} == {("direct", "direct")}
    # q2 has no direct sample that is right: no pair, and it counts as all wrong under that filter.
    assert summary["questions_all_wrong"] == 1 and summary["trajectories_of_other_variants"] == 4
    assert summary["by_variant"] == {"chosen": {"direct": 1}, "rejected": {"direct": 1}}
    assert any("only direct: 4 trajectories of other variants left out" in line
               for line in describe(summary, config(pair_variants=["direct"])))


def test_pair_variants_is_checked_and_at_its_default_leaves_the_identity_as_it_was():
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match="--pair-variants thoughtful"):
        config(pair_variants=["thoughtful"]).validate()
    assert "pair_variants" not in config().identity()  # artifacts published before the option still match
    assert config(pair_variants=["direct"]).identity()["pair_variants"] == ["direct"]
