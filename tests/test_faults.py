"""Bad input, faults and preemption: clear errors, the right exit codes, nothing lost.

    OMP_NUM_THREADS=1 python -m pytest tests/test_faults.py -q      # ~2-3 minutes on 2 CPU cores

Preemption is real: a phase runs in a child process through the real CLI and dies with
`os._exit(137)` right after a checkpoint has been published (tests/preemption.py), then
the phase is run again, as a restarted Job would. Disk full is real too where the test
can mount a small tmpfs (root); otherwise those tests are skipped, and say why.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app import artifacts, checkpoints
from app.cli import main as cli_main
from app.cli import parse
from app.data import read_jsonl, synthetic_problems, write_jsonl
from app.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_RETRYABLE, ConfigError, InputError
from tests import preemption
from tests.conftest import SHARED_GSM8K, run_phase
from tests.s3_server import moto_endpoint, s3  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
# Adapters of an uninterrupted run and of a killed-and-resumed one, fp32 on the CPU: the same
# arithmetic in the same order, so they agree exactly; 1e-6 leaves room for other BLAS builds.
ADAPTER_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from app.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("faults-base")
    build_tiny_model(path, warmup_steps=10, hidden_size=128, log=lambda *_: None)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A store and a private work/cache dir for this module (children inherit the environment)."""
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_WORKDIR", str(root / "work"))
        mp.setenv("PIPELINE_CACHE", str(root / "cache"))
        yield root


def sft_flags(store: Path, run_id: str, base: Path, data: Path) -> list[str]:
    # 96 rows, batch 8: 12 optimizer steps, a checkpoint every 4.
    return ["--store", str(store), "--run-id", run_id, "--base-model", str(base), "--train-data", str(data),
            "--train-limit", "96", "--sft-batch-size", "8", "--sft-epochs", "1", "--save-steps", "4",
            "--max-reject-rate", "0.02"]


def dpo_flags(store: Path, run_id: str, base: Path) -> list[str]:
    # 48 pairs, batch 4: 12 optimizer steps, a checkpoint every 4.
    return ["--store", str(store), "--run-id", run_id, "--base-model", str(base), "--dpo-batch-size", "4",
            "--dpo-grad-accum", "1", "--save-steps", "4"]


def run_recorded(phase: str, flags: list[str], record: Path) -> int:
    """The phase in this process through the real CLI, recording what each step trained on."""
    undo = preemption.patch_phase(phase, record)
    try:
        return cli_main([phase, *flags])
    finally:
        undo()


def run_killed(phase: str, flags: list[str], record: Path, after_checkpoint: int) -> subprocess.CompletedProcess:
    """The phase in a child process that dies right after checkpoint `after_checkpoint` is published."""
    result = subprocess.run([sys.executable, "tests/preemption.py", str(record), str(after_checkpoint), phase, *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == preemption.KILLED_EXIT_CODE, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def adapter(store: Path, run_id: str, phase: str) -> dict:
    from safetensors.torch import load_file

    path, _ = artifacts.fetch(artifacts.phase_uri(str(store), run_id, phase))
    return load_file(path / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def steps_and_rows(record: Path) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["rows"]) for r in preemption.read_record(record)]


@pytest.fixture(scope="module")
def train_data(workspace) -> Path:
    """Training problems as JSONL, one of them with a gold answer that does not parse."""
    rows = synthetic_problems(120, seed=7)
    rows.insert(5, {"question": "How many?", "answer": "nobody knows"})
    path = workspace / "train.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="module")
def sft_straight(workspace, tiny_base, train_data):
    """An uninterrupted SFT run: (store, run id, what each step trained on)."""
    store, record = workspace / "store", workspace / "sft-straight.jsonl"
    assert run_recorded("sft", sft_flags(store, "straight", tiny_base, train_data), record) == 0
    return store, "straight", steps_and_rows(record)


# ---------------------------------------------------------------------------------------------
# Preemption: SFT and DPO resume from the store's checkpoints to the same adapter


def test_sft_killed_after_a_checkpoint_resumes_to_the_same_adapter(workspace, tiny_base, train_data, sft_straight):
    store, straight_id, straight_steps = sft_straight
    flags = sft_flags(store, "preempted", tiny_base, train_data)
    record = workspace / "sft-preempted.jsonl"
    uri = artifacts.phase_uri(str(store), "preempted", "sft")

    killed = run_killed("sft", flags, record, after_checkpoint=8)
    assert "killed right after checkpoint 8" in killed.stdout
    assert artifacts.read_manifest(uri) is None  # not published: the phase did not finish
    assert [e["step"] for e in checkpoints.read_pointer(uri)] == [4, 8]
    before_restart = steps_and_rows(record)
    assert [step for step, _ in before_restart] == list(range(1, 9))

    assert run_recorded("sft", flags, record) == 0  # the restarted Job: same command
    after_restart = steps_and_rows(record)[len(before_restart):]
    assert [step for step, _ in after_restart] == list(range(9, 13))  # steps 1-8 were not redone
    # Same batches in the same order: nothing repeated, nothing skipped.
    assert before_restart + after_restart == straight_steps
    fingerprints = [row for _, rows in straight_steps for row in rows]
    assert len(fingerprints) == len(set(fingerprints)) == 96  # one epoch: every example exactly once

    assert max_difference(adapter(store, "preempted", "sft"), adapter(store, straight_id, "sft")) <= ADAPTER_TOLERANCE
    manifest = artifacts.read_manifest(uri)
    assert manifest["metrics"]["resumed_from_step"] == 8 and manifest["metrics"]["steps"] == 12
    # Rows rejected are counted and reported (1 unparseable gold answer of 121, under the 2% allowed).
    assert manifest["metrics"]["rejected_rows"] == 1
    assert checkpoints.read_pointer(uri) == []  # published: the checkpoints are gone


def test_dpo_killed_after_a_checkpoint_resumes_to_the_same_adapter(workspace, tiny_base, sft_straight):
    """DPO's model holds the trained adapter and TRL's frozen `ref` copy; both must come back right."""
    store, straight_id, _ = sft_straight
    sft_dir, _ = artifacts.fetch(artifacts.phase_uri(str(store), straight_id, "sft"))
    prefs = synthetic_preferences(workspace / "prefs", 48)
    for run_id in ("dpo-straight", "dpo-preempted"):
        artifacts.publish(sft_dir, artifacts.phase_uri(str(store), run_id, "sft"), phase="sft", config={})
        artifacts.publish(prefs, artifacts.phase_uri(str(store), run_id, "preferences"), phase="preferences",
                          config={})

    straight = workspace / "dpo-straight.jsonl"
    assert run_recorded("dpo", dpo_flags(store, "dpo-straight", tiny_base), straight) == 0
    record = workspace / "dpo-preempted.jsonl"
    # A checkpoint every 2 steps, killed after step 4: the resumed run's own checkpoints at 6 and 8
    # rotate step 4 (the one it resumed from) out of the store before it finishes.
    flags = dpo_flags(store, "dpo-preempted", tiny_base)
    flags[flags.index("--save-steps") + 1] = "2"
    run_killed("dpo", flags, record, after_checkpoint=4)
    assert run_recorded("dpo", flags, record) == 0

    assert [step for step, _ in steps_and_rows(record)] == list(range(1, 13))
    assert steps_and_rows(record) == steps_and_rows(straight)
    resumed, uninterrupted = adapter(store, "dpo-preempted", "dpo"), adapter(store, "dpo-straight", "dpo")
    assert max_difference(resumed, uninterrupted) <= ADAPTER_TOLERANCE
    assert max_difference(resumed, adapter(store, straight_id, "sft")) > 1e-4  # and DPO did train it
    metrics = artifacts.read_manifest(artifacts.phase_uri(str(store), "dpo-preempted", "dpo"))["metrics"]
    assert metrics["resumed_from_step"] == 4 and metrics["step0_loss"] == pytest.approx(0.6931, abs=1e-3)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_sft_resumed_past_its_own_checkpoint_rotation_publishes_the_same_adapter(kind, request, workspace, tiny_base,
                                                                                  train_data, sft_straight):
    """Killed after checkpoint 4 of 12 (one every 2 steps), then resumed: its checkpoints at 6 and 8
    rotate step 4, the one it resumed from, out of the store; the run must finish all the same."""
    store = request.getfixturevalue("s3").store if kind == "s3" else str(workspace / "store")
    run_id = f"rotated-{kind}"
    flags = sft_flags(store, run_id, tiny_base, train_data)
    flags[flags.index("--save-steps") + 1] = "2"
    record = workspace / f"sft-{run_id}.jsonl"
    run_killed("sft", flags, record, after_checkpoint=4)
    assert run_recorded("sft", flags, record) == 0

    uri = artifacts.phase_uri(store, run_id, "sft")
    assert artifacts.read_manifest(uri)["metrics"]["resumed_from_step"] == 4
    assert checkpoints.read_pointer(uri) == []
    # Nothing left behind: no Trainer scratch, no cached copy of a checkpoint.
    assert not (workspace / "work" / f"sft-trainer-{run_id}").exists()
    cache = Path(os.environ["PIPELINE_CACHE"]) / "artifacts"
    assert [p.name for p in cache.glob("*") if p.is_dir()] == []
    straight_store, straight_id, _ = sft_straight
    assert max_difference(adapter(store, run_id, "sft"), adapter(straight_store, straight_id, "sft")) <= ADAPTER_TOLERANCE


def synthetic_preferences(directory: Path, count: int) -> Path:
    from app.prompts import build_prompt, sft_target

    pairs = []
    for row in synthetic_problems(count, seed=11):
        chosen = sft_target(row["answer"])
        rejected = chosen.rsplit("#### ", 1)[0] + "#### 99999"
        pairs.append({"prompt": build_prompt(row["question"]), "chosen": chosen, "rejected": rejected,
                      "type": "correctness"})
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "preferences.jsonl", pairs)
    return directory


def test_checkpoint_of_another_config_is_not_resumed(workspace, tiny_base, train_data, capsys):
    store = workspace / "store"
    uri = artifacts.phase_uri(str(store), "changed", "sft")
    stale = workspace / "stale-checkpoint"
    stale.mkdir()
    (stale / "trainer_state.json").write_text("{}")  # would break the Trainer if it were ever resumed
    checkpoints.save_checkpoint(uri, 4, stale, config_hash="0123456789abcdef")

    flags = sft_flags(store, "changed", tiny_base, train_data)
    flags[flags.index("--train-limit") + 1] = "16"  # 2 steps: enough to show it starts fresh
    assert cli_main(["sft", *flags]) == 0
    out = capsys.readouterr().out
    assert "made with another config" in out and "not resuming from them" in out
    assert "starting at step 0" in out
    assert artifacts.read_manifest(uri)["metrics"]["resumed_from_step"] == 0


# ---------------------------------------------------------------------------------------------
# The checkpoint store itself: manifest last, pointer after, verified reads


def checkpoint_dir(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "state.bin").write_bytes(text.encode() * 100)
    return root


def test_interrupted_checkpoint_upload_is_never_resumed(tmp_path):
    from tests.s3_server import interrupted_dir, kill_publish_midway

    uri = artifacts.phase_uri(str(tmp_path / "store"), "r", "sft")
    checkpoints.save_checkpoint(uri, 4, checkpoint_dir(tmp_path / "c4", "four"), "h1")
    target = Path(checkpoints.checkpoint_uri(uri, 8))
    kill_publish_midway(interrupted_dir(tmp_path / "c8"), str(target),
                        lambda: any(p.name == "a.json" for p in target.rglob("*")))
    assert any(target.rglob("a.json")) and not (target / "manifest.json").exists()  # files, no manifest

    latest = checkpoints.latest_checkpoint(uri, "h1")
    assert checkpoints.checkpoint_info(latest)["step"] == 4
    assert (latest / "state.bin").read_bytes() == b"four" * 100


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    uri = artifacts.phase_uri(str(tmp_path / "store"), "r", "dpo")
    for step in (4, 8, 12):
        checkpoints.save_checkpoint(uri, step, checkpoint_dir(tmp_path / f"c{step}", str(step)), "h1")
    assert [e["step"] for e in checkpoints.read_pointer(uri)] == [8, 12]  # keep=2: step 4 was removed
    assert not (Path(checkpoints.checkpoint_uri(uri, 4)) / "manifest.json").exists()
    newest = Path(checkpoints.checkpoint_uri(uri, 12))
    (newest / artifacts.read_manifest(str(newest))["data_dir"] / "state.bin").write_bytes(b"bit rot")  # in the store
    messages = []
    fallback = checkpoints.latest_checkpoint(uri, "h1", log=messages.append)
    assert checkpoints.checkpoint_info(fallback)["step"] == 8
    assert any("cannot be used" in m and "00000012" in m for m in messages)


def test_chunked_progress_keeps_every_chunk_and_clear_removes_them(tmp_path):
    uri = artifacts.phase_uri(str(tmp_path / "store"), "r", "rollouts")
    for end in (4, 8, 12):
        checkpoints.save_checkpoint(uri, end, checkpoint_dir(tmp_path / f"c{end}", str(end)), "h1", keep=None)
    assert [step for step, _ in checkpoints.complete_checkpoints(uri, "h1")] == [4, 8, 12]
    assert checkpoints.complete_checkpoints(uri, "other-config") == []
    checkpoints.clear_checkpoints(uri)
    assert checkpoints.read_pointer(uri) == [] and checkpoints.latest_checkpoint(uri, "h1") is None
    assert not list(Path(checkpoints.checkpoints_uri(uri)).rglob("manifest.json"))


def test_checkpoints_through_s3(tmp_path, s3):  # noqa: F811
    """The same rules against a real S3 API (moto over HTTP): rotation deletes objects, clear leaves none."""
    uri = artifacts.phase_uri(s3.store, "r", "sft")
    for step in (4, 8, 12):
        checkpoints.save_checkpoint(uri, step, checkpoint_dir(tmp_path / f"c{step}", str(step)), "h1")
    prefix = "proj/runs/r/sft/checkpoints/"
    assert not any(key.startswith(prefix + "00000004/") for key in s3.keys(prefix))
    latest = checkpoints.latest_checkpoint(uri, "h1")
    assert latest.is_relative_to(tmp_path / "cache")  # downloaded into the verified cache
    assert (latest / "state.bin").read_bytes() == b"12" * 100
    assert checkpoints.latest_checkpoint(uri, "another-config") is None
    checkpoints.clear_checkpoints(uri)
    assert s3.keys(prefix) == []


# ---------------------------------------------------------------------------------------------
# Rollouts: chunked progress, resumed without redoing finished questions


def rollout_flags(store: Path, run_id: str, base: Path) -> list[str]:
    # 12 questions in chunks of 4, one sample per variant, short answers.
    return ["--store", str(store), "--run-id", run_id, "--base-model", str(base), "--rollout-limit", "12",
            "--chunk-size", "4", "--samples-per-question", "3", "--max-new-tokens", "24", "--backend", "hf",
            "--question-batch-size", "4"]


def test_rollouts_killed_after_a_chunk_resume_without_redoing_it(workspace, tiny_base, sft_straight):
    store, straight_id, _ = sft_straight
    sft_dir, _ = artifacts.fetch(artifacts.phase_uri(str(store), straight_id, "sft"))
    for run_id in ("roll-straight", "roll-preempted"):
        artifacts.publish(sft_dir, artifacts.phase_uri(str(store), run_id, "sft"), phase="sft", config={})
    assert cli_main(["rollouts", *rollout_flags(store, "roll-straight", tiny_base)]) == 0

    uri = artifacts.phase_uri(str(store), "roll-preempted", "rollouts")
    killed = run_killed("rollouts", rollout_flags(store, "roll-preempted", tiny_base), workspace / "unused.jsonl",
                        after_checkpoint=4)
    assert "killed right after checkpoint 4" in killed.stdout
    assert artifacts.read_manifest(uri) is None
    assert [e["step"] for e in checkpoints.read_pointer(uri)] == [4]

    assert cli_main(["rollouts", *rollout_flags(store, "roll-preempted", tiny_base)]) == 0
    manifest = artifacts.read_manifest(uri)
    generation = manifest["timings"]["generation"]
    assert generation["resumed_questions"] == 4
    assert generation["prompts"] == (12 - 4) * 3  # only the 8 unfinished questions, 3 variants each

    def records(run_id):
        path, _ = artifacts.fetch(artifacts.phase_uri(str(store), run_id, "rollouts"))
        return [row for _, row in read_jsonl(path / "rollouts.jsonl")]

    resumed, uninterrupted = records("roll-preempted"), records("roll-straight")
    assert [r["id"] for r in resumed] == [r["id"] for r in uninterrupted]  # question order, no gaps, no repeats
    assert resumed == uninterrupted  # same seeds per question: the same samples
    assert checkpoints.read_pointer(uri) == []


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming file, line and field, exit code 3, before any model loads.
# `--base-model` names a hub model that does not exist (and HF_HUB_OFFLINE is set): had a model
# been loaded first, the error would be about it instead.

NO_MODEL = "no-such-org/no-such-model"


def one_error_line(capsys) -> str:
    return one_error_line_of(capsys.readouterr().err)


def one_error_line_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "Ann has 2 pens and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"})


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"question": "q", "answer": '], r"train.jsonl:2: malformed JSON"),
    ([GOOD, GOOD, '{"question": "q"}'], r"train.jsonl:3: missing field 'answer'"),
    ([GOOD, '{"question": ["q"], "answer": "#### 1"}'], r"train.jsonl:2: field 'question' must be a string, not list"),
    ([""], r"train.jsonl: no usable rows \(empty dataset\)"),
    ([GOOD, json.dumps({"question": "q", "answer": "no number"})],
     r"1 usable of 2 rows \(1 rejected: gold answer does not parse x1\); over the allowed reject rate 1.0%"),
])
def test_bad_training_data_fails_at_once_with_exit_code_3(tmp_path, capsys, lines, message):
    data = write_lines(tmp_path / "train.jsonl", lines)
    code = cli_main(["sft", "--store", str(tmp_path / "store"), "--train-data", str(data), "--base-model", NO_MODEL])
    assert code == EXIT_INPUT
    line = one_error_line(capsys)
    assert line.startswith("error: ") and re.search(message, line), line
    assert artifacts.read_manifest(artifacts.phase_uri(str(tmp_path / "store"), "demo", "sft")) is None


def test_bad_question_file_fails_rollouts_and_eval_too(tmp_path, capsys, sft_straight):
    store, run_id, _ = sft_straight
    data = write_lines(tmp_path / "questions.jsonl", [GOOD, "not json"])
    common = ["--store", str(store), "--run-id", run_id, "--base-model", NO_MODEL]
    assert cli_main(["rollouts", *common, "--rollout-data", str(data)]) == EXIT_INPUT
    assert "questions.jsonl:2: malformed JSON" in one_error_line(capsys)
    assert cli_main(["eval", *common, "--models", "base", "--eval-data", str(data)]) == EXIT_INPUT
    assert "questions.jsonl:2: malformed JSON" in one_error_line(capsys)


@pytest.mark.parametrize("rows, pair_types, message", [
    ([], "correctness,quality", r"preferences.jsonl: no preference pairs of types \['correctness', 'quality'\]"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "type": "quality"}], "correctness",
     r"no preference pairs of types \['correctness'\]; nothing to train on"),
    ([{"prompt": "p", "chosen": "a", "type": "correctness"}], "correctness",
     r"preferences.jsonl:1: field 'rejected' missing or not a string"),
])
def test_preferences_without_usable_pairs_stop_dpo_before_any_model_loads(tmp_path, capsys, rows, pair_types,
                                                                          message):
    store = tmp_path / "store"
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    write_jsonl(prefs / "preferences.jsonl", rows)
    artifacts.publish(prefs, artifacts.phase_uri(str(store), "demo", "preferences"), phase="preferences", config={})
    code = cli_main(["dpo", "--store", str(store), "--base-model", NO_MODEL, "--pair-types", pair_types])
    assert code == EXIT_INPUT
    assert re.search(message, one_error_line(capsys))


def test_adapter_for_another_base_model_fails_rollouts_with_exit_code_3(tmp_path, capsys, sft_straight):
    from app.tiny import build_tiny_model

    store, run_id, _ = sft_straight
    other = tmp_path / "other-base"
    build_tiny_model(other, warmup_steps=0, hidden_size=128, layers=2, log=lambda *_: None)
    capsys.readouterr()  # its progress bars
    code = cli_main(["rollouts", "--store", str(store), "--run-id", run_id, "--base-model", str(other),
                     "--rollout-limit", "2", "--backend", "hf"])
    assert code == EXIT_INPUT
    line = one_error_line(capsys)
    assert "sft adapter: adapter was trained for a base model of shape" in line
    assert "'num_hidden_layers': 4" in line and "'num_hidden_layers': 2" in line


@pytest.mark.parametrize("argv, message", [
    (["sft", "--save-steps", "-1"], "--save-steps must be >= 0"),
    (["dpo", "--save-steps", "-5"], "--save-steps must be >= 0"),
    (["rollouts", "--chunk-size", "0"], "--chunk-size must be >= 1"),
    (["rollouts", "--max-reject-rate", "1.5"], "--max-reject-rate must be in [0, 1]"),
    (["eval", "--max-reject-rate", "-0.1"], "--max-reject-rate must be in [0, 1]"),
    (["dpo", "--dpo-learning-rate", "3"], "--dpo-learning-rate must be in (0, 1)"),
    (["sft", "--lora-r", "0"], "--lora-r and --lora-alpha must be >= 1"),
])
def test_config_value_out_of_range_exits_2_with_one_line(capsys, argv, message):
    assert cli_main(argv) == EXIT_CONFIG
    line = one_error_line(capsys)
    assert line.startswith("error: ") and message in line, line


def test_save_steps_and_chunk_size_do_not_change_the_identity():
    from app.cli import parse

    for command, flag in (("sft", "--save-steps"), ("dpo", "--save-steps"), ("rollouts", "--chunk-size")):
        _, a = parse([command, flag, "7"], environ={})
        _, b = parse([command, flag, "300"], environ={})
        assert a.identity() == b.identity(), command
        _, c = parse([command, "--seed", "1"], environ={})
        assert c.identity() != a.identity()


# ---------------------------------------------------------------------------------------------
# Generation faults: truncated or unparseable trajectories never make a pair


def test_truncated_and_unparseable_trajectories_are_excluded_and_counted(tmp_path):
    def t(text, correct, reward, truncated=False, answer="5"):
        return {"variant": "direct", "full_text": text, "answer": answer, "num_tokens": 12, "truncated": truncated,
                "correct": correct, "quality": 0.5, "length_penalty": 0.0, "reward": reward}

    records = [
        {"id": "q1", "question": "Ann has 2 pens and buys 3. How many?", "gold": "5", "trajectories": [
            t("2 + 3 = 5\n#### 5", True, 1.3),
            t("2 + 3 = 5 and then 5 + 5 = 10 and", False, 1.9, truncated=True, answer="5"),  # cut off: high reward
            t("I think it is many", False, 0.1, answer=None),  # no parseable answer
            t("2 + 3 = 6\n#### 6", False, 0.0, answer="6")]},
        {"id": "q2", "question": "Bo has 9 and gives 4. How many?", "gold": "5", "trajectories": [
            t("9 - 4 = 5\n#### 5", True, 1.2), t("9 - 4 = 5, so 5", True, 1.0),
            t("9 - 4 = 5 then 5 - 1 =", False, 2.0, truncated=True)]},
    ]
    store, work = tmp_path / "store", tmp_path / "rollouts"
    work.mkdir()
    write_jsonl(work / "rollouts.jsonl", records)
    artifacts.publish(work, artifacts.phase_uri(str(store), "gen", "rollouts"), phase="rollouts", config={})

    manifest = run_phase("preferences", store, "gen", NO_MODEL, "--quality-threshold", "0.1")
    assert manifest["metrics"]["excluded_trajectories"] == {"truncated": 2, "no_answer": 1}
    path, _ = artifacts.fetch(artifacts.phase_uri(str(store), "gen", "preferences"))
    pairs = [row for _, row in read_jsonl(path / "preferences.jsonl")]
    excluded = {"2 + 3 = 5 and then 5 + 5 = 10 and", "I think it is many", "9 - 4 = 5 then 5 - 1 ="}
    assert {(p["question_id"], p["type"]) for p in pairs} == {("q1", "correctness"), ("q2", "quality")}
    for p in pairs:
        assert p["chosen_reward"] > p["rejected_reward"] and p["margin"] > 0
        assert p["chosen"] not in excluded and p["rejected"] not in excluded


# ---------------------------------------------------------------------------------------------
# Storage faults: disk full fails the phase, exit 1, nothing marked complete.
# (Transient S3 errors and failed uploads: tests/test_s3store.py::test_upload_survives_a_short_outage
# and ::test_failed_upload_never_leaves_a_manifest.)


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 1 MiB tmpfs (a real file system that runs out of space); skipped without root."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_up(directory: Path) -> None:
    with open(directory / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def rollouts_for_preferences(store: Path, run_id: str, tmp_path: Path) -> None:
    work = tmp_path / "rollouts-in"
    work.mkdir(exist_ok=True)
    t = {"variant": "direct", "num_tokens": 9, "truncated": False, "quality": 0.5, "length_penalty": 0.0}
    write_jsonl(work / "rollouts.jsonl", [
        {"id": f"q{i}", "question": f"What is {i} + 1?", "gold": str(i + 1), "trajectories": [
            {**t, "full_text": f"{i} + 1 = {i + 1}\n#### {i + 1}", "answer": str(i + 1), "correct": True, "reward": 1.3},
            {**t, "full_text": f"{i} + 1 = {i}\n#### {i}", "answer": str(i), "correct": False, "reward": 0.1}]}
        for i in range(40)])
    artifacts.publish(work, artifacts.phase_uri(str(store), run_id, "rollouts"), phase="rollouts", config={})


@pytest.mark.parametrize("full", ["store", "workdir"])
def test_disk_full_fails_the_phase_without_publishing(tmp_path, small_disk, monkeypatch, capsys, full):
    store = small_disk / "store" if full == "store" else tmp_path / "store"
    monkeypatch.setenv("PIPELINE_WORKDIR", str(small_disk / "work" if full == "workdir" else tmp_path / "work"))
    rollouts_for_preferences(store, "full", tmp_path)
    fill_up(small_disk)

    code = cli_main(["preferences", "--store", str(store), "--run-id", "full", "--base-model", NO_MODEL])
    assert code == EXIT_RETRYABLE
    assert one_error_line(capsys).startswith("error: disk full: [Errno 28] No space left on device")
    phase_dir = store / "runs" / "full" / "preferences"
    assert artifacts.read_manifest(str(phase_dir)) is None
    assert not [p for p in phase_dir.rglob("*") if p.is_file()]  # the attempt's files were removed too

    (small_disk / "filler").unlink()  # space again: the retried Job publishes
    assert cli_main(["preferences", "--store", str(store), "--run-id", "full", "--base-model", NO_MODEL]) == 0
    assert artifacts.read_manifest(str(phase_dir))["metrics"]["pairs"] == 40


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, small_disk):
    uri = artifacts.phase_uri(str(small_disk / "store"), "r", "sft")
    checkpoints.save_checkpoint(uri, 4, checkpoint_dir(tmp_path / "c4", "four"), "h1")
    fill_up(small_disk)
    with pytest.raises(OSError) as exc:
        checkpoints.save_checkpoint(uri, 8, checkpoint_dir(tmp_path / "c8", "eight"), "h1")
    assert exc.value.errno == errno.ENOSPC
    assert [e["step"] for e in checkpoints.read_pointer(uri)] == [4]
    assert not (Path(checkpoints.checkpoint_uri(uri, 8)) / "manifest.json").exists()
    assert checkpoints.checkpoint_info(checkpoints.latest_checkpoint(uri, "h1"))["step"] == 4


# ---------------------------------------------------------------------------------------------
# Exit codes the Jobs' podFailurePolicy acts on


def test_exit_codes_match_the_pod_failure_policy():
    import yaml

    from app import errors

    policy = yaml.safe_load((REPO / "k8s" / "base" / "job-defaults.yaml").read_text())["spec"]["podFailurePolicy"]
    fail_job = [r for r in policy["rules"] if r["action"] == "FailJob"]
    assert [r["onExitCodes"] for r in fail_job] == [{"operator": "In", "values": [EXIT_CONFIG, EXIT_INPUT]}]
    assert {"type": "DisruptionTarget", "status": "True"} in next(
        r for r in policy["rules"] if r["action"] == "Ignore")["onPodConditions"]
    assert errors.ConfigError.exit_code == EXIT_CONFIG and errors.InputError.exit_code == EXIT_INPUT
    assert errors.StorageError.exit_code == EXIT_RETRYABLE not in (EXIT_CONFIG, EXIT_INPUT)


def test_corrupt_input_artifact_is_exit_3_and_an_unreachable_store_is_exit_1(tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    rollouts_for_preferences(store, "c", tmp_path)
    manifest = artifacts.read_manifest(artifacts.phase_uri(str(store), "c", "rollouts"))
    data = store / "runs" / "c" / "rollouts" / manifest["data_dir"] / "rollouts.jsonl"
    data.write_text(data.read_text().replace("What is 3", "What is 8"))
    assert cli_main(["preferences", "--store", str(store), "--run-id", "c"]) == EXIT_INPUT
    assert "rollouts.jsonl: SHA-256 does not match the manifest" in one_error_line(capsys)

    from tests.s3_server import free_port, point_at

    point_at(monkeypatch.setenv, monkeypatch.delenv, f"http://127.0.0.1:{free_port()}", tmp_path)
    assert cli_main(["preferences", "--store", "s3://bucket/x", "--run-id", "c"]) == EXIT_RETRYABLE
    assert "cannot reach the S3 endpoint" in one_error_line(capsys)



# ---------------------------------------------------------------------------------------------
# Config identity: the values a run uses, checked before any model or data loads


def test_an_equal_config_is_not_retrained_and_another_is_refused_before_anything_loads(tmp_path, tiny_base,
                                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", synthetic_problems(16, seed=3))
    flags = ["--run-id", "same", "--base-model", str(tiny_base), "--sft-batch-size", "16", "--save-steps", "0"]
    # The tiny preset's sft_epochs is the int 3; the flags below give the float 3.0.
    assert cli_main(["sft", "--store", "runs", "--train-data", "train.jsonl", *flags]) == 0
    uri = artifacts.phase_uri("runs", "same", "sft")
    published = artifacts.read_manifest(uri)
    capsys.readouterr()

    for same in (["--store", "./runs", "--train-data", "train.jsonl", "--sft-epochs", "3"],
                 ["--store", str(tmp_path / "runs"), "--train-data", "./train.jsonl", "--sft-epochs", "3.0"],
                 ["--store", "runs/", "--train-data", str(tmp_path / "train.jsonl")]):
        assert cli_main(["sft", *same, *flags]) == 0, same
        out = capsys.readouterr().out
        assert "already published with this config; nothing to do" in out and "training:" not in out, same
    assert artifacts.read_manifest(uri) == published

    # Another config cannot publish over the artifact: refused before the data or the model loads,
    # nothing trained, no checkpoint left inside the published phase.
    changed = ["sft", "--store", "runs", "--train-data", "train.jsonl", "--sft-epochs", "2", *flags,
               "--save-steps", "1"]
    assert cli_main(changed) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert "already published with a different config" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "data:" not in captured.out and "base model:" not in captured.out
    assert not (tmp_path / "runs" / "runs" / "same" / "sft" / "checkpoints").exists()
    assert artifacts.read_manifest(uri) == published


# ---------------------------------------------------------------------------------------------
# Credentials in URIs are never printed, logged or saved


def test_credentials_in_an_endpoint_url_are_never_printed(tmp_path, capsys, monkeypatch):
    from tests.s3_server import free_port, point_at

    point_at(monkeypatch.setenv, monkeypatch.delenv, f"http://admin:SECRET@127.0.0.1:{free_port()}", tmp_path)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert cli_main(["preferences", "--store", "s3://bucket/x", "--run-id", "c"]) == EXIT_RETRYABLE
    captured = capsys.readouterr()
    assert "SECRET" not in captured.out + captured.err
    assert "cannot reach the S3 endpoint http://***@127.0.0.1:" in one_error_line_of(captured.err)


def test_credentials_in_a_config_value_are_not_saved_in_the_manifest_or_the_log(tmp_path, capsys):
    from app.log import log, log_config
    from app.phases.preferences import Config

    config = Config(store=str(tmp_path / "store"), base_model="https://user:SECRET@models.example.com/abel")
    log_config(config)
    work = tmp_path / "out"
    work.mkdir()
    (work / "x.txt").write_text("x")
    uri = artifacts.phase_uri(config.store, "r", "preferences")
    manifest = artifacts.publish(work, uri, phase="preferences", config=config.to_dict(), identity=config.identity(),
                                 inputs={"base": {"uri": "s3://bucket/base", "endpoint": "http://k:SECRET@h"}})
    log(f"published {manifest['config']['base_model']}")
    stored = (tmp_path / "store" / "runs" / "r" / "preferences" / "manifest.json").read_text()
    assert "SECRET" not in stored and "https://***@models.example.com/abel" in stored
    assert artifacts.manifest_digest(artifacts.read_manifest(uri)) == artifacts.manifest_digest(manifest)
    out = capsys.readouterr().out
    assert "SECRET" not in out and "***@models.example.com" in out


# ---------------------------------------------------------------------------------------------
# Inputs that are not there, or not what they must be: one line, exit 3, before any model loads


def not_utf8(path: Path) -> Path:
    good = json.dumps(synthetic_problems(1)[0]) + "\n"
    path.write_bytes(good.encode() + b'{"question": "caf\xe9?", "answer": "#### 1"}\n')  # Latin-1, not UTF-8
    return path


@pytest.mark.parametrize("phase,flag,make,message", [
    ("sft", "--train-data", lambda d: d, "is a directory; give a JSONL file"),
    ("rollouts", "--rollout-data", lambda d: d, "is a directory"),
    ("eval", "--eval-data", lambda d: d, "is a directory"),
    ("eval", "--eval-data", lambda d: d / "missing.jsonl", "missing.jsonl: no such file"),
    ("sft", "--train-data", lambda d: not_utf8(d / "latin1.jsonl"), "latin1.jsonl:2: not UTF-8 text (byte 0xe9"),
    ("sft", "--base-model", lambda d: "./no-such-model", "--base-model ./no-such-model: no such directory"),
    ("sft", "--base-model", lambda d: d / "absent", "absent: no such directory"),
    ("sft", "--base-model", lambda d: "~/no-such-model-here", "~/no-such-model-here: no such directory"),
    ("dpo", "--base-model", lambda d: d, "no config.json in that directory"),
    ("pipeline", "--eval-data", lambda d: d, "--eval-data"),
])
def test_missing_or_wrong_kind_of_input_is_one_line_and_exit_3_before_any_model_loads(tmp_path, capsys, phase, flag,
                                                                                     make, message):
    store = tmp_path / "store"
    argv = [phase, "--store", str(store), "--run-id", "in", flag, str(make(tmp_path))]
    assert cli_main(argv) == EXIT_INPUT
    captured = capsys.readouterr()
    assert message in one_error_line_of(captured.err)
    assert "base model" not in captured.out  # nothing was loaded, and the demo model was not built
    assert not (store / "runs" / "in" / "base").exists()


def test_a_missing_s3_data_object_is_exit_3_before_any_model_loads(s3, capsys):  # noqa: F811
    argv = ["sft", "--store", s3.store, "--run-id", "in", "--train-data", f"s3://{s3.bucket}/data/train.jsonl"]
    assert cli_main(argv) == EXIT_INPUT
    assert "train.jsonl: no such object" in one_error_line(capsys)
    argv[-1] = f"s3://{s3.bucket}/data/"
    assert cli_main(argv) == EXIT_INPUT
    assert "not a prefix" in one_error_line(capsys)
    argv[-2:] = ["--base-model", f"{s3.store}/models/absent"]
    assert cli_main(argv) == EXIT_INPUT
    assert "not a published artifact" in one_error_line(capsys)


def test_malformed_json_names_the_column_where_the_line_breaks(tmp_path):
    path = write_lines(tmp_path / "cut.jsonl", ['{"question": "q", "answer": "#### 1"}', '{"question": "q", "answer"'])
    with pytest.raises(InputError, match=r"cut.jsonl:2: malformed JSON \(Expecting ':' delimiter at column 27\)"):
        read_jsonl(path)


# ---------------------------------------------------------------------------------------------
# Gold answers must carry GSM8K's '#### N' marker, unless an option says otherwise


def test_a_gold_answer_without_the_marker_is_rejected_and_counted_unless_accepted(tmp_path, capsys):
    from app.data import load_problems

    rows = synthetic_problems(98, seed=5) + [{"question": "Ann has 2 pens and buys 3. How many?",
                                              "answer": "Ann has 2 + 3 = 5 pens."}] * 2
    data = tmp_path / "train.jsonl"
    write_jsonl(data, rows)
    argv = ["sft", "--store", str(tmp_path / "store"), "--train-data", str(data), "--base-model", NO_MODEL]
    assert cli_main(argv) == EXIT_INPUT  # 2% rejected, 1% allowed: before any model loads
    assert ("98 usable of 100 rows (2 rejected: gold answer without '#### N' x2); over the allowed reject rate"
            in one_error_line(capsys))

    problems, report = load_problems(str(data), accept_unmarked=True)
    assert len(problems) == 100 and report.rejected == 0
    assert problems[-1].gold == "5" and problems[-1].answer.endswith("5 pens.\n#### 5")
    _, config = parse(["sft", "--accept-answer-without-marker"], environ={})
    assert config.accept_answer_without_marker and "accept_answer_without_marker" in config.identity()


@pytest.mark.skipif(not (SHARED_GSM8K / "train.jsonl").exists(), reason="no local copy of GSM8K")
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_shipped_gsm8k_row_carries_the_marker(split):
    from app.data import load_problems

    problems, report = load_problems(str(SHARED_GSM8K / f"{split}.jsonl"), split=split, max_reject_rate=0)
    assert report.rejected == 0 and len(problems) == {"train": 7473, "test": 1319}[split]


# ---------------------------------------------------------------------------------------------
# The reference guide's rollout flags: --n_samples is the number of questions


def test_the_guides_rollout_flags_mean_what_the_guide_says(workspace, tiny_base, sft_straight, capsys):
    _, config = parse(["rollouts", "--n_samples", "500", "--question_batch_size", "16"], environ={})
    assert (config.rollout_limit, config.question_batch_size, config.samples_per_question) == (500, 16, 6)
    with pytest.raises(ConfigError, match="PIPELINE_N_SAMPLES is no longer read"):
        parse(["rollouts"], environ={"PIPELINE_N_SAMPLES": "8"})
    with pytest.raises(ConfigError, match="500 trajectories per question is more than 64"):
        parse(["rollouts", "--samples_per_question", "500", "--samples-per-variant", "0", "--variants", "direct"],
              environ={})

    store, run_id, _ = sft_straight
    common = ["--store", str(store), "--run-id", run_id, "--base-model", str(tiny_base), "--backend", "hf",
              "--max_new_tokens", "16"]
    # 3,400 questions x 60 per question = 204,000 trajectories: refused before any model loads.
    assert cli_main(["rollouts", *common, "--rollout-data", "synthetic:3400", "--samples-per-variant", "20"]) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert "3400 questions x 60 samples (20 direct, 20 reflective, 20 deliberative) = 204,000 trajectories" in captured.out
    assert "204,000 trajectories is more than 200,000" in one_error_line_of(captured.err)
    assert "vllm" not in captured.out and "generat" not in captured.out.split("204,000")[1]

    assert cli_main(["rollouts", *common, "--n_samples", "4", "--samples_per_question", "3", "--force"]) == 0
    assert "4 questions x 3 samples (1 direct, 1 reflective, 1 deliberative) = 12 trajectories" in capsys.readouterr().out
    summary = artifacts.read_manifest(artifacts.phase_uri(str(store), run_id, "rollouts"))["metrics"]
    assert summary["questions"] == 4 and summary["trajectories"] == 12


def test_the_first_log_line_says_where_the_artifacts_land(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["preferences"]) == EXIT_INPUT  # defaults: no rollouts published yet
    first = capsys.readouterr().out.splitlines()[0]
    assert "preferences  run=demo  -> artifacts/runs/demo/preferences" in first
    assert (tmp_path / "artifacts").is_dir() and not (tmp_path / "runs").exists()


def test_a_crash_prints_its_traceback_without_credentials(monkeypatch, capsys):
    from app.phases import preferences

    def crash(config):
        raise RuntimeError("could not open http://admin:SECRET@minio:9000/bucket")

    monkeypatch.setattr(preferences, "main", crash)
    assert cli_main(["preferences"]) == EXIT_RETRYABLE
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: could not open http://***@minio:9000/bucket" in err
    assert "SECRET" not in err
