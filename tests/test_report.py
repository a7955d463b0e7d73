"""The run report: numbers for people, report.md and report.html rebuilt from the small run's
published artifacts (locally and from S3), and the command's errors.

    python -m pytest tests/test_report.py -q

tests/test_report_browser.py renders the same page in headless Chromium.
"""

from __future__ import annotations

import json
import re

import pytest

from app import artifacts, report
from app.cli import main as cli_main
from app.phases import PHASES
from tests.s3_server import moto_endpoint, s3  # noqa: F401  (pytest fixtures)

PLOTS = {"wall-times", "sft-loss", "rollouts", "pairs", "dpo-curves", "accuracy"}


@pytest.mark.parametrize("value, text", [
    (4.744803428649902, "4.745"), (0.118405781686306, "0.1184"), (15441.3, "15,441"), (0.0, "0"), (3, "3"),
    (1200, "1,200"), (0.6931471805599453, "0.6931"), (-0.0123456, "-0.01235"), (2.5e-07, "2.5e-07"), (None, "–"),
])
def test_numbers_are_rounded_for_people(value, text):
    assert report.number(value) == text


@pytest.mark.parametrize("value, text", [(4.2, "4.2 s"), (42.4, "42 s"), (372.0, "6 min 12 s")])
def test_durations(value, text):
    assert report.seconds(value) == text


@pytest.fixture(scope="module")
def built(small_run):
    """`python -m app report` on the small run; (store, run_id, manifests, report.md, report.html)."""
    store, run_id, manifests = small_run
    assert cli_main(["report", "--store", str(store), "--run-id", run_id]) == 0
    root = store / "runs" / run_id
    return store, run_id, manifests, (root / "report.md").read_text(), (root / "report.html").read_text()


def test_markdown_has_every_phase_with_rounded_numbers(built):
    store, run_id, manifests, markdown, _ = built
    for phase in PHASES:
        assert re.search(rf"^\| {phase} \| published \| \d", markdown, re.M), phase
    assert not re.findall(r"\d\.\d{5,}", markdown), "unrounded numbers in report.md"
    sft = manifests["sft"]["metrics"]
    assert f"loss {report.number(sft['first_logged_loss'])} -> {report.number(sft['last_logged_loss'])}" in markdown
    results = manifests["eval"]["metrics"]["results"]
    for dataset, by_model in results.items():
        line = " -> ".join(f"{report.MODEL_LABEL[m]} {by_model[m]['accuracy']:.1%}" for m in ("base", "sft", "dpo"))
        assert line in markdown


def test_html_is_self_contained_with_every_plot(built):
    *_, page = built
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "the page loads something from outside"
    plots = re.findall(r'<img class="plot" data-plot="([^"]+)"[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {name for name, _ in plots} == PLOTS
    import base64

    for name, data in plots:
        width, height = report.png_size(base64.b64decode(data))
        assert width >= 400 and height >= 200, name
        assert f'data-plot="{name}" alt=' in page
    assert "<script" not in page


def test_html_shows_accuracy_flips_and_checksums_from_the_artifacts(built):
    store, run_id, manifests, _, page = built
    summary_path, _ = artifacts.fetch(artifacts.phase_uri(str(store), run_id, "eval"))
    results = json.loads((summary_path / "summary.json").read_text())["results"]
    for dataset, by_model in results.items():
        for model, row in by_model.items():
            assert f'data-metric="{dataset}/{model}/accuracy">{row["accuracy"]:.1%}</td>' in page
            assert f'data-metric="{dataset}/{model}/correct">{row["correct"]} / {row["total"]}</td>' in page
        rows = {m: [r for _, r in _read_jsonl(summary_path / dataset / f"{m}.jsonl")] for m in by_model}
        for before, after in (("base", "sft"), ("sft", "dpo")):
            fixed, broken = report.flips(rows[before], rows[after])
            assert (f'<span class="good">{len(fixed)} fixed</span>, <span class="bad">{len(broken)} broken</span>'
                    in page)
            if fixed:
                assert f'data-kind="fixed"><summary>{len(fixed)} questions fixed' in page
    for phase, manifest in manifests.items():
        for name, meta in manifest["files"].items():
            assert meta["sha256"] in page, f"{phase}/{name}"
        assert artifacts.manifest_digest(artifacts.read_manifest(artifacts.phase_uri(str(store), run_id, phase))) in page
    pairs = manifests["preferences"]["metrics"]
    assert f"{pairs['pairs']} pairs from {pairs['questions']} questions" in page


def _read_jsonl(path):
    from app.data import read_jsonl

    return read_jsonl(path)


def test_report_from_s3_reads_only_what_the_manifests_list(small_run, s3):  # noqa: F811
    """The small run copied into a bucket file by file (manifests last, as publish does); the
    report built from there is the same page as the local one, except for where the store is."""
    store, run_id, manifests = small_run
    root = store / "runs" / run_id
    for phase in PHASES:
        manifest = manifests[phase]
        for name in manifest["files"]:
            key = f"proj/runs/{run_id}/{phase}/{manifest['data_dir']}/{name}"
            s3.client.upload_file(str(root / phase / manifest["data_dir"] / name), s3.bucket, key)
        s3.client.upload_file(str(root / phase / "manifest.json"), s3.bucket, f"proj/runs/{run_id}/{phase}/manifest.json")
    assert cli_main(["report", "--store", s3.store, "--run-id", run_id]) == 0
    remote = s3.client.get_object(Bucket=s3.bucket, Key=f"proj/runs/{run_id}/report.html")["Body"].read().decode()
    local = report.render_html(report.collect(str(store), run_id, PHASES))
    assert remote.replace(s3.store, "STORE") == local.replace(str(store), "STORE")
    markdown = s3.client.get_object(Bucket=s3.bucket, Key=f"proj/runs/{run_id}/report.md")["Body"].read().decode()
    assert f"# Run `{run_id}`" in markdown and s3.store in markdown


def test_a_run_that_is_not_published_is_an_input_error(tmp_path, capsys):
    assert cli_main(["report", "--store", str(tmp_path), "--run-id", "nothing-here"]) == 3
    assert "no phase of run 'nothing-here' is published" in capsys.readouterr().err


def test_a_partial_run_shows_what_is_there(small_run, tmp_path):
    """Only SFT published yet: the report says so for the rest and draws only what it has."""
    store, run_id, manifests = small_run
    run = report.collect(str(store), run_id, PHASES)
    run.manifests = {phase: (m if phase == "sft" else None) for phase, m in run.manifests.items()}
    run.trajectories, run.dpo_history, run.eval_summary, run.eval_rows, run.eval_report = {}, [], {}, {}, ""
    page = report.render_html(run)
    assert set(re.findall(r'data-plot="([^"]+)"', page)) == {"wall-times", "sft-loss"}
    assert page.count("not published") == 4
    assert "| dpo | not published |" in report.render_markdown(run)
