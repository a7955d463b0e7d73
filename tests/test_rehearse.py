"""The rehearsal and what it reads: phase timings, the random model of a shape, the bf16
conversion of .bin checkpoints, the merged policy; `python -m app rehearse` end to end on the
tiny shape through the real CLI (each phase in its own process, as on a GPU)."""

import json
import subprocess
import sys
import time

import pytest

from app import artifacts
from app.cli import main as cli_main
from app.errors import EXIT_CONFIG
from app.generation_vllm import parse_start_log
from app.shapes import SHAPES, read_marker, write_random_model
from app.timing import PhaseTimer, first_step_excess

VLLM_START_LOG = """\
INFO 12-02 03:01:10 [gpu_model_runner.py:5307] Model loading took 13.5 GiB memory and 6.412345 seconds
INFO 12-02 03:01:40 [monitor.py:20] torch.compile took 28.75 s in total
INFO 12-02 03:02:20 [gpu_model_runner.py:6708] Graph capturing finished in 21 secs, took 0.95 GiB
INFO 12-02 03:02:21 [core.py:345] init engine (profile, create kv cache, warmup model) took 70.31 s (compilation: 28.75 s)
"""


def test_vllm_start_lines_are_read_back():
    assert parse_start_log(VLLM_START_LOG) == {"load_s": 6.412345, "compile_s": 28.75, "graphs_s": 21.0,
                                               "init_engine_s": 70.31}
    assert parse_start_log("nothing here") == dict.fromkeys(("load_s", "compile_s", "graphs_s", "init_engine_s"))


def test_phase_timer_splits_and_the_first_step_excess():
    timer = PhaseTimer()
    with timer.part("load"):
        time.sleep(0.05)
    timer.add_start({"start_s": 10.0, "load_s": 4.0})
    timer.add("work", 20.0)
    timer.move("work", "compile", 5.0)
    metrics = timer.metrics(tokens=3000)
    assert metrics["load_s"] == pytest.approx(4.05, abs=0.03)
    assert (metrics["compile_s"], metrics["work_s"]) == (11.0, 15.0)
    assert metrics["tokens_per_s"] == 200.0 and metrics["peak_gpu_mem_gib"] is None  # no GPU here
    # the first step took 10 s, the others 1 s: 9 s of it was compilation
    assert first_step_excess([10.0, 11.0, 12.0, 13.0], started=0.0) == pytest.approx(9.0)
    assert first_step_excess([10.0], started=0.0) == 0.0  # too few steps to tell


def test_random_model_of_a_shape_and_its_bf16_conversion(tmp_path):
    import torch
    from safetensors.torch import load_file

    from app.models import convert_to_bf16_safetensors, load_causal_lm, load_tokenizer, resolve_base_model

    texts = ["Tom has 3 apples and buys 4 more.\nHe has 3 + 4 = 7.\n#### 7"] * 50
    info = write_random_model(SHAPES["tiny"], tmp_path / "bin", texts, fp32_bin=True)
    assert read_marker(tmp_path / "bin") == info and info["parameters"] > 0
    assert sorted(p.name for p in (tmp_path / "bin").glob("*.bin")) == ["pytorch_model-00001-of-00001.bin"]
    assert len(load_tokenizer(str(tmp_path / "bin"))) == SHAPES["tiny"]["vocab_size"]
    config = json.loads((tmp_path / "bin" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 4096

    (tmp_path / "converted").mkdir()
    convert_to_bf16_safetensors(tmp_path / "bin", tmp_path / "converted")
    original = torch.load(tmp_path / "bin" / "pytorch_model-00001-of-00001.bin", weights_only=True)
    converted = load_file(tmp_path / "converted" / "model.safetensors")
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == torch.bfloat16 and torch.equal(converted[name], tensor.to(torch.bfloat16))
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # A phase in bf16 on a GPU publishes the conversion once in the run's store; later phases reuse it.
    store = str(tmp_path / "store")
    path, lineage = resolve_base_model(str(tmp_path / "bin"), store, "r1", log=lambda *_: None, publish_bf16=True)
    manifest = artifacts.read_manifest(artifacts.phase_uri(store, "r1", "base"))
    assert lineage["phase"] == "base" and manifest["config"]["base_model"] == str(tmp_path / "bin")
    assert "model.safetensors" in manifest["files"] and manifest["metrics"]["convert_s"] >= 0
    again, _ = resolve_base_model(str(tmp_path / "bin"), store, "r1", log=lambda *_: None, publish_bf16=True)
    assert again == path
    assert load_causal_lm(path, bf16=False).config.model_type == "mistral"
    # Without it (CPU, fp32), the checkpoint is used as it is.
    assert resolve_base_model(str(tmp_path / "bin"), store, "r2")[1] == {"path": str((tmp_path / "bin").resolve())}


def test_merged_policy_computes_what_base_plus_adapter_computes(tmp_path):
    import torch
    from peft import PeftModel, get_peft_model

    from app.models import load_causal_lm, lora_config, merge_adapter

    texts = ["Ann reads 12 pages.\n#### 12"] * 40
    write_random_model(SHAPES["tiny"], tmp_path / "base", texts)
    torch.manual_seed(1)
    peft = get_peft_model(load_causal_lm(str(tmp_path / "base"), bf16=False), lora_config(8, 16))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained adapter is not zero
    peft.save_pretrained(tmp_path / "adapter")
    merge_adapter(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", bf16=False, log=lambda *_: None)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    adapted = PeftModel.from_pretrained(load_causal_lm(str(tmp_path / "base"), bf16=False), tmp_path / "adapter")
    with torch.no_grad():
        expected = adapted(ids).logits
        merged = load_causal_lm(str(tmp_path / "merged"), bf16=False)(ids).logits
        base = load_causal_lm(str(tmp_path / "base"), bf16=False)(ids).logits
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changed something to merge


def test_samples_spread_over_the_variants():
    from app.phases.rollouts import Config

    assert Config(samples_per_question=8).samples_by_variant() == [3, 3, 2]
    assert Config(samples_per_question=6).samples_by_variant() == [2, 2, 2]
    assert Config(samples_per_question=8, samples_per_variant=4).samples_by_variant() == [4, 4, 4]


def test_bad_rehearsal_settings_stop_before_anything_runs(tmp_path, capsys):
    assert cli_main(["rehearse", "--store", str(tmp_path), "--share", "0"]) == EXIT_CONFIG
    assert "--share must be in (0, 1]" in capsys.readouterr().err
    assert cli_main(["rehearse", "--store", str(tmp_path), "--from", "eval", "--to", "sft"]) == EXIT_CONFIG
    assert not any(tmp_path.iterdir())


def test_rehearse_end_to_end_on_the_tiny_shape(tmp_path):
    """The command CI runs: every phase through the CLI, timings read back from the manifests."""
    store = tmp_path / "store"
    argv = [sys.executable, "-m", "app", "rehearse", "--shape", "tiny", "--share", "0.002", "--samples-per-question", "3",
            "--max-new-tokens", "8", "--backend", "hf", "--train-data", "synthetic:1500",
            "--eval-data", "synthetic-test:500", "--store", str(store)]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PIPELINE_WORKDIR": str(tmp_path / "work")}
    first = subprocess.run([*argv, "--to", "rollouts"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rest = subprocess.run([*argv, "--from", "preferences"], env=env, capture_output=True, text=True)  # resumed
    assert rest.returncode == 0, rest.stdout[-3000:] + rest.stderr[-3000:]

    run = store / "runs" / "rehearse"
    data = json.loads((run / "rehearsal.json").read_text())
    rows = {row["phase"]: row for row in data["rows"]}
    for phase in ("sft", "rollouts", "dpo", "eval"):
        row = rows[phase]
        assert row["wall_s"] > 0 and row["work_s"] > 0 and row["tokens_per_s"] > 0, row
        assert row["load_s"] > 0 and row["compile_s"] is not None
        assert row["wall_s"] >= row["total_s"] >= row["work_s"]
    sft = artifacts.read_manifest(artifacts.phase_uri(str(store), "rehearse", "sft"))
    assert sft["metrics"]["examples"] == 3 and sft["metrics"]["timing"]["steps"] == sft["metrics"]["steps"]
    prefs = artifacts.read_manifest(artifacts.phase_uri(str(store), "rehearse", "preferences"))
    assert prefs["metrics"]["by_type"]["gold_anchored"] == prefs["metrics"]["pairs"] > 0  # a random model: all wrong
    dpo = artifacts.read_manifest(artifacts.phase_uri(str(store), "rehearse", "dpo"))
    assert dpo["metrics"]["pairs_by_type"]["gold_anchored"] == dpo["metrics"]["pairs"]
    assert "merged policy" in rows["rollouts"]["note"] and data["lengths"]["answer_tokens"] > 8
    assert data["projected_total_s"] == pytest.approx(sum(data["projection_s"].values()))
    report = (run / "rehearsal.md").read_text()
    assert "| sft |" in report and "Projected reference pipeline on 8 GPUs" in report
    assert "Projected reference pipeline" in rest.stdout  # printed too
    again = subprocess.run([*argv, "--from", "sft"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout  # everything published: no rerun
