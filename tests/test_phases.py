"""Each phase's entry point on the tiny model, through the real CLI parser and artifact store.

`small_run` (conftest) runs sft -> rollouts -> preferences -> dpo -> eval once; these
tests check what each phase published, then rerun/force/fail cases against it.
"""

import json
import math

import pytest

from app import artifacts
from app.data import read_jsonl
from app.errors import InputError
from tests.conftest import run_phase


def fetch(store, run_id, phase):
    return artifacts.fetch(artifacts.phase_uri(str(store), run_id, phase))


def test_sft_publishes_a_peft_adapter(small_run):
    store, run_id, manifests = small_run
    path, manifest = fetch(store, run_id, "sft")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "base_model_shape.json"):
        assert name in manifest["files"] and (path / name).exists()
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and set(adapter["target_modules"]) >= {"q_proj", "down_proj"}
    metrics = manifest["metrics"]
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]  # it learned something
    assert manifest["inputs"]["base"]["path"]


def test_sft_loss_is_on_the_completion_only(small_run, tiny_model_dir):
    from app.models import load_tokenizer
    from app.phases.sft import Config, build_trainer
    from app.data import load_problems

    problems, _ = load_problems("synthetic:4")
    trainer, tokenizer = build_trainer(Config(base_model=str(tiny_model_dir), bf16=False), str(tiny_model_dir),
                                       problems)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    prompt_ids = load_tokenizer(str(tiny_model_dir))(trainer.train_dataset[0]["prompt"])["input_ids"]
    labels = batch["labels"][0].tolist()
    first_label = next(i for i, t in enumerate(labels) if t != -100)
    assert first_label >= len(prompt_ids) - 1  # nothing of the prompt is trained on
    assert labels[first_label:][-1] in (tokenizer.eos_token_id, -100) or tokenizer.eos_token_id in labels


def test_rollouts_records_and_scores(small_run):
    store, run_id, _ = small_run
    path, manifest = fetch(store, run_id, "rollouts")
    records = [row for _, row in read_jsonl(path / "rollouts.jsonl")]
    assert len(records) == 16
    for record in records:
        assert len(record["trajectories"]) == 6
        assert record["solution"].rstrip().endswith(f"#### {record['gold']}")  # the reference, for gold-anchored pairs
        assert {t["variant"] for t in record["trajectories"]} == {"direct", "reflective", "deliberative"}
        for t in record["trajectories"]:
            assert set(t) >= {"full_text", "answer", "num_tokens", "reward", "correct", "truncated", "quality"}
            assert 0 < t["num_tokens"] <= 64
            if t["truncated"]:
                assert not t["correct"]
    summary = json.loads((path / "summary.json").read_text())
    assert summary["throughput"]["tokens"] > 0 and summary["throughput"]["backend"] == "hf"
    assert manifest["inputs"]["sft"]["manifest_sha256"]


def test_preferences_follow_the_rules(small_run):
    store, run_id, _ = small_run
    path, manifest = fetch(store, run_id, "preferences")
    pairs = [row for _, row in read_jsonl(path / "preferences.jsonl")]
    assert pairs and manifest["metrics"]["pairs"] == len(pairs)
    for p in pairs:
        assert p["type"] in ("correctness", "quality")  # no gold-anchored pairs without the option
        assert p["chosen"] != p["rejected"] and p["chosen_reward"] > p["rejected_reward"]


def test_dpo_starts_at_ln2_with_zero_margin(small_run):
    store, run_id, _ = small_run
    path, manifest = fetch(store, run_id, "dpo")
    metrics = manifest["metrics"]
    assert metrics["step0_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["step0_margin"] == pytest.approx(0.0, abs=1e-3)
    assert sum(metrics["pairs_by_type"].values()) == metrics["pairs"] and metrics["pairs_by_type"]["gold_anchored"] == 0
    assert "adapter_model.safetensors" in manifest["files"]
    assert not any(name.startswith("ref/") for name in manifest["files"])  # the frozen copy is not shipped
    # Lineage: the DPO adapter traces to its preferences, SFT adapter and base model.
    assert set(manifest["inputs"]) >= {"preferences", "sft", "base"}
    prefs = artifacts.read_manifest(manifest["inputs"]["preferences"]["uri"])
    assert "rollouts" in prefs["inputs"]


def test_dpo_adapter_differs_from_sft(small_run):
    from safetensors.torch import load_file

    store, run_id, _ = small_run
    sft = load_file(fetch(store, run_id, "sft")[0] / "adapter_model.safetensors")
    dpo = load_file(fetch(store, run_id, "dpo")[0] / "adapter_model.safetensors")
    assert sft.keys() == dpo.keys()
    assert any(not (sft[k] == dpo[k]).all() for k in sft)


def test_eval_side_by_side(small_run):
    store, run_id, _ = small_run
    path, manifest = fetch(store, run_id, "eval")
    results = manifest["metrics"]["results"]["synthetic-test"]
    assert set(results) == {"base", "sft", "dpo"}
    for model in ("base", "sft", "dpo"):
        rows = [row for _, row in read_jsonl(path / "synthetic-test" / f"{model}.jsonl")]
        assert len(rows) == 24
        assert all(set(r) >= {"question", "gold", "prediction", "answer", "correct"} for r in rows)
        assert results[model]["correct"] == sum(r["correct"] for r in rows)
    report = (path / "report.md").read_text()
    assert "| base |" in report and "| dpo |" in report and " -> " in report
    paired = json.loads((path / "summary.json").read_text())["paired"]["synthetic-test"]
    assert list(paired) == ["base->sft", "sft->dpo", "base->dpo"]
    for name, c in paired.items():
        before, after = (results[m]["correct"] for m in name.split("->"))
        assert c["fixed"] - c["broken"] == after - before and c["n"] == 24
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1] and 0 < c["mcnemar_p"] <= 1
    assert "| sft -> dpo |" in report


def test_rerun_with_same_config_is_a_noop(small_run, tiny_model_dir):
    store, run_id, manifests = small_run
    uri = artifacts.phase_uri(str(store), run_id, "preferences")
    before = (store / "runs" / run_id / "preferences" / "manifest.json").stat().st_mtime_ns
    again = run_phase("preferences", store, run_id, tiny_model_dir)
    assert again == artifacts.read_manifest(uri) == manifests["preferences"]
    assert (store / "runs" / run_id / "preferences" / "manifest.json").stat().st_mtime_ns == before


def test_phase_without_its_input_fails_clearly(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match=r"runs/empty/sft is not published"):
        run_phase("rollouts", tmp_path, "empty", tiny_model_dir)


def test_adapter_for_another_base_model_is_refused(small_run, tmp_path):
    from app.tiny import build_tiny_model

    store, run_id, _ = small_run
    other = tmp_path / "other-base"
    build_tiny_model(other, warmup_steps=0, hidden_size=128, layers=2, log=lambda *_: None)
    with pytest.raises(InputError, match="adapter was trained for a base model of shape"):
        run_phase("eval", store, run_id, other, "--eval-limit", "2", "--force")  # another config: redo it


def publish_shards(store, run_id, phase, source_dir, source_manifest, names, num_shards=2):
    """`source`'s files cut into `num_shards` shard artifacts the way an Indexed Job's pods write them."""
    from app.data import write_jsonl
    from app.shards import shard_slice, shard_uri

    for index in range(num_shards):
        with artifacts.workdir("shard") as work:
            for name in names:
                rows = [row for _, row in read_jsonl(source_dir / name)]
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(work / name, shard_slice(rows, index, num_shards))
            config = {**source_manifest["config"], "num_shards": num_shards, "shard_index": index}
            artifacts.publish(work, shard_uri(artifacts.phase_uri(str(store), run_id, phase), index), phase=phase,
                              config=config, timings=source_manifest["timings"])


@pytest.mark.parametrize("phase", ["rollouts", "eval"])
def test_merged_shards_equal_the_unsharded_artifact(small_run, tiny_model_dir, phase):
    store, run_id, _ = small_run
    path, manifest = fetch(store, run_id, phase)
    names = [name for name in manifest["files"] if name.endswith(".jsonl")]
    publish_shards(store, f"merged-{phase}", phase, path, manifest, names)
    merged = run_phase("merge", store, f"merged-{phase}", tiny_model_dir, "--phase", phase, "--num-shards", "2")
    merged_path, _ = fetch(store, f"merged-{phase}", phase)
    assert sorted(name for name in merged["files"] if name.endswith(".jsonl")) == sorted(names)
    for name in names:
        assert (merged_path / name).read_text() == (path / name).read_text()
    assert merged["metrics"].items() <= manifest["metrics"].items()
    assert set(merged["inputs"]) == {"shard_00000", "shard_00001"}
    if phase == "eval":
        report = (merged_path / "report.md").read_text().replace(f"merged-{phase}", run_id)
        assert report == (path / "report.md").read_text()
    else:
        throughput = json.loads((merged_path / "summary.json").read_text())["throughput"]
        assert throughput == [manifest["timings"]["generation"]] * 2


def test_merge_refuses_missing_shards(small_run, tiny_model_dir):
    store, run_id, _ = small_run
    path, manifest = fetch(store, run_id, "rollouts")
    publish_shards(store, "one-shard-short", "rollouts", path, manifest, ["rollouts.jsonl"], num_shards=2)
    with pytest.raises(InputError, match=r"shards \[2\] of 3 are not published"):
        run_phase("merge", store, "one-shard-short", tiny_model_dir, "--phase", "rollouts", "--num-shards", "3")
    assert artifacts.read_manifest(artifacts.phase_uri(str(store), "one-shard-short", "rollouts")) is None
