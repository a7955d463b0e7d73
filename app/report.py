"""The run report: `report.md` and a self-contained `report.html` from a run's published artifacts.

    python -m app report --store s3://bucket/gsm8k --run-id r1     # rebuild both, then open report.html

`collect` reads what the phases published (manifests first, every file checked against its
checksum by `artifacts.fetch`); `render_html` and `render_markdown` turn that into pages and
touch nothing else, so a report can be rebuilt at any time from the store alone. The HTML page
has no external assets: the plots (matplotlib, Agg) are PNGs embedded as base64.

What it shows: each phase's wall time and key numbers; SFT's and DPO's loss curves (DPO's
reward margins and preference accuracy) from the trainers' log history; rollout reward and
length distributions per prompt variant and the share correct; preference pairs by type;
base / SFT / DPO accuracy per dataset with 95% intervals, eval's paired comparisons (difference,
paired interval, McNemar p) when it recorded them, and the questions each step fixed or broke;
where every artifact file is and its SHA-256.
"""

from __future__ import annotations

import base64
import html
import io
import json
import struct
from dataclasses import dataclass, field

from app import artifacts
from app.phases.eval import model_rank, model_round

MODEL_LABEL = {"base": "Base", "sft": "SFT", "dpo": "DPO"}
EXAMPLES_PER_FLIP = 5
DPO_SERIES = [("loss", "loss"), ("rewards/margins", "reward margin (chosen − rejected)"),
              ("rewards/accuracies", "preference accuracy")]


def ordered_models(by_model) -> list[str]:
    """The models of `by_model` in eval's order: base, sft, dpo, then dpo-r2, dpo-r3, ..."""
    return sorted(by_model, key=model_rank)


def model_label(model: str) -> str:
    """'sft' -> 'SFT'; a later round's policy, 'dpo-r2', -> 'DPO round 2'."""
    name, _, round_ = model.partition("-r")
    return MODEL_LABEL.get(model) or (f"{MODEL_LABEL.get(name, name)} round {round_}" if round_ else model)


# ---------------------------------------------------------------------------------------------
# Numbers for people


def number(value, digits: int = 4) -> str:
    """4.744803428649902 -> '4.745', 0.118405781686306 -> '0.1184', 15441.3 -> '15,441'."""
    if value is None:
        return "–"
    if isinstance(value, bool) or isinstance(value, int):
        return f"{value:,}" if not isinstance(value, bool) else str(value)
    value = float(value)
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 10 ** -(digits - 1):
        return f"{value:.1e}"
    return f"{value:.{digits}g}"


def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def seconds(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest:02d} s"


# ---------------------------------------------------------------------------------------------
# What the store holds


@dataclass
class RunArtifacts:
    """Everything the report shows, read from the store (or built by hand in tests)."""
    store: str
    run_id: str
    manifests: dict[str, dict | None]                     # phase -> manifest (None: not published)
    sft_history: list[dict] = field(default_factory=list)  # the Trainer's log_history rows with a loss
    dpo_history: list[dict] = field(default_factory=list)
    round_dpo_history: dict[int, list[dict]] = field(default_factory=dict)  # round r >= 2 -> its DPO's rows
    trajectories: dict[str, dict[str, list]] = field(default_factory=dict)  # variant -> reward/num_tokens/correct
    eval_summary: dict = field(default_factory=dict)
    eval_rows: dict[tuple[str, str], list[dict]] = field(default_factory=dict)  # (dataset, model) -> rows
    eval_report: str = ""                                  # eval's report.md


def collect(store: str, run_id: str, phases: tuple[str, ...]) -> RunArtifacts:
    """Read the run's published artifacts; a phase that is not published is shown as such. Later
    rounds of preference training (`round-<r>/`, r = 2, 3, ... while any of its phases is
    published) come before eval, as the pipeline runs them."""
    from app.phases import ROUND_PHASES, step_name

    uris = {phase: artifacts.phase_uri(store, run_id, phase) for phase in phases if phase != "eval"}
    manifests = {phase: artifacts.read_manifest(uri) for phase, uri in uris.items()}
    r = 2
    while True:
        found = {step_name((phase, r)): artifacts.phase_uri(store, run_id, phase, r) for phase in ROUND_PHASES}
        found_manifests = {step: artifacts.read_manifest(uri) for step, uri in found.items()}
        if not any(found_manifests.values()):
            break
        uris.update(found)
        manifests.update(found_manifests)
        r += 1
    if "eval" in phases:
        uris["eval"] = artifacts.phase_uri(store, run_id, "eval")
        manifests["eval"] = artifacts.read_manifest(uris["eval"])
    run = RunArtifacts(store=store, run_id=run_id, manifests=manifests)

    def history(phase: str) -> list[dict]:
        if not (manifests.get(phase) and "metrics.json" in manifests[phase]["files"]):
            return []
        path, _ = artifacts.fetch(uris[phase])
        return [row for row in json.loads((path / "metrics.json").read_text()).get("loss_history", []) if "loss" in row]

    run.sft_history, run.dpo_history = history("sft"), history("dpo")
    for later in range(2, r):
        if rows := history(step_name(("dpo", later))):
            run.round_dpo_history[later] = rows
    if manifests.get("rollouts"):
        from app.data import read_jsonl

        path, _ = artifacts.fetch(uris["rollouts"])
        for _, record in read_jsonl(path / "rollouts.jsonl"):
            for t in record["trajectories"]:
                slot = run.trajectories.setdefault(t.get("variant", "?"),
                                                   {"reward": [], "num_tokens": [], "correct": []})
                for key in slot:
                    slot[key].append(t[key])
    if manifests.get("eval"):
        from app.data import read_jsonl

        path, manifest = artifacts.fetch(uris["eval"])
        run.eval_summary = json.loads((path / "summary.json").read_text())
        if "report.md" in manifest["files"]:
            run.eval_report = (path / "report.md").read_text()
        for name in manifest["files"]:
            if name.endswith(".jsonl") and name.count("/") == 1:
                dataset, model = name[: -len(".jsonl")].split("/")
                run.eval_rows[(dataset, model)] = [row for _, row in read_jsonl(path / name)]
    return run


def write(store: str, run_id: str, run: RunArtifacts, timings: dict | None = None,
          total_seconds: float | None = None) -> dict[str, str]:
    """Write report.md and report.html under `<store>/runs/<run-id>/`; returns {name: uri}."""
    root = artifacts.run_uri(store, run_id)
    backend, key = artifacts.open_store(root)
    written = {}
    for name, text in (("report.md", render_markdown(run, timings, total_seconds)),
                       ("report.html", render_html(run, timings, total_seconds))):
        backend.write_bytes(artifacts.join(key, name) if key else name, text.encode())
        written[name] = artifacts.join(root, name)
    return written


# ---------------------------------------------------------------------------------------------
# Facts both pages show


def phase_rows(run: RunArtifacts, timings: dict | None, arrow: str = "→") -> list[dict]:
    """One row per phase: status, wall time, key numbers."""
    rows = []
    for phase, manifest in run.manifests.items():
        timing = (timings or {}).get(phase)
        if manifest is None:
            rows.append({"phase": phase, "status": "not published", "seconds": None, "key": ""})
            continue
        published_s = manifest.get("timings", {}).get("total_s")
        if timing and timing.get("skipped"):
            status, wall = "skipped (already published)", published_s
        elif timing:
            status, wall = "ran", timing.get("seconds")
        else:
            status, wall = "published", published_s
        rows.append({"phase": phase, "status": status, "seconds": wall,
                     "key": key_numbers(phase, manifest.get("metrics", {}), arrow)})
    return rows


def key_numbers(phase: str, metrics: dict, arrow: str = "→") -> str:
    phase = phase.rsplit("/", 1)[-1]  # round-2/dpo: a dpo
    if phase == "sft":
        return (f"loss {number(metrics.get('first_logged_loss'))} {arrow} {number(metrics.get('last_logged_loss'))}, "
                f"{number(metrics.get('steps'))} steps")
    if phase == "rollouts":
        return (f"{number(metrics.get('trajectories'))} trajectories, {percent(metrics.get('accuracy'))} correct, "
                f"mean reward {number(metrics.get('mean_reward'), 3)}")
    if phase == "preferences":
        by_type = metrics.get("by_type", {})
        gold = f", {number(by_type['gold_anchored'])} gold-anchored" if by_type.get("gold_anchored") else ""
        return (f"{number(metrics.get('pairs'))} pairs ({number(by_type.get('correctness'))} correctness, "
                f"{number(by_type.get('quality'))} quality{gold})")
    if phase == "dpo":
        return (f"step-0 loss {number(metrics.get('step0_loss'))}, last loss {number(metrics.get('last_loss'))}, "
                f"margin {number(metrics.get('last_margin'), 3)}, "
                f"preference accuracy {percent(metrics.get('last_accuracy'))}")
    if phase == "eval":
        return "; ".join(f"{dataset}: " + f" {arrow} ".join(f"{model_label(m)} {percent(by_model[m]['accuracy'])}"
                                                     for m in ordered_models(by_model))
                         for dataset, by_model in metrics.get("results", {}).items())
    return ""


def flips(before: list[dict], after: list[dict]) -> tuple[list[tuple[dict, dict]], list[tuple[dict, dict]]]:
    """(fixed, broken): the questions wrong before and right after, and the other way round."""
    pairs = list(zip(before, after))
    fixed = [(b, a) for b, a in pairs if not b["correct"] and a["correct"]]
    broken = [(b, a) for b, a in pairs if b["correct"] and not a["correct"]]
    return fixed, broken


def steps(by_model: dict) -> list[tuple[str, str]]:
    models = ordered_models(by_model)
    return list(zip(models, models[1:]))


def artifact_rows(run: RunArtifacts) -> list[dict]:
    """Every published file: where it is, its size and SHA-256 (from the manifests)."""
    rows = []
    for phase, manifest in run.manifests.items():
        if manifest is None:
            continue
        base = artifacts.phase_uri(run.store, run.run_id, phase)  # where this report found it
        data_dir = manifest.get("data_dir", "")
        rows.append({"phase": phase, "name": artifacts.MANIFEST, "uri": artifacts.join(base, artifacts.MANIFEST),
                     "size": None, "sha256": artifacts.manifest_digest(manifest)})
        for name, meta in sorted(manifest["files"].items()):
            uri = artifacts.join(base, data_dir, name) if data_dir else artifacts.join(base, name)
            rows.append({"phase": phase, "name": name, "uri": uri, "size": meta["size"], "sha256": meta["sha256"]})
    return rows


def size(nbytes) -> str:
    if nbytes is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


# ---------------------------------------------------------------------------------------------
# report.md


def render_markdown(run: RunArtifacts, timings: dict | None = None, total_seconds: float | None = None) -> str:
    first = next((m for m in run.manifests.values() if m), {}) or {}
    config = first.get("config", {})
    lines = [f"# Run `{run.run_id}`", "", f"Store: `{run.store}`  preset: `{config.get('preset')}`  "
             f"base model: `{config.get('base_model')}`", "",
             "| phase | status | time | key numbers |", "|---|---|---|---|"]
    for row in phase_rows(run, timings, arrow="->"):
        wall = seconds(row["seconds"]) if row["seconds"] is not None else ""
        lines.append(f"| {row['phase']} | {row['status']} | {wall} | {row['key']} |")
    if total_seconds is not None:
        lines += ["", f"Total wall time this invocation: {seconds(total_seconds)}"]
    lines.append("")
    if run.eval_report:
        lines += [run.eval_report.strip(), ""]  # eval's own tables: accuracy, flips, paired comparisons
    lines.append("The full report with plots: `report.html` beside this file.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots (PNG bytes)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # fixed size: figsize x dpi, no tight cropping
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def plot_wall_times(rows: list[dict]) -> bytes:
    plt = _pyplot()
    shown = [r for r in rows if r["seconds"] is not None]
    fig, ax = plt.subplots(figsize=(7.2, 0.5 + 0.42 * max(1, len(shown))))
    names = [r["phase"] for r in shown][::-1]
    values = [float(r["seconds"]) for r in shown][::-1]
    bars = ax.barh(names, values, color="#4c72b0")
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + seconds(value), va="center", fontsize=8)
    ax.set_xlabel("wall time (s)")
    ax.set_xlim(0, max(values + [1]) * 1.2)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.5 / fig.get_figheight() + 0.05, top=0.95)
    return _png(fig)


def plot_curves(history: list[dict], series: list[tuple[str, str]]) -> bytes:
    """One panel per (log key, label) against the optimizer step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 2.9), squeeze=False)
    for ax, (key, label) in zip(axes[0], series):
        points = [(row["step"], row[key]) for row in history if key in row and row[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 60 else None, linewidth=1.4, color="#4c72b0")
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
    fig.subplots_adjust(left=0.08 if len(series) > 1 else 0.12, right=0.98, bottom=0.17, top=0.88, wspace=0.3)
    return _png(fig)


def plot_rollouts(trajectories: dict[str, dict[str, list]]) -> bytes:
    plt = _pyplot()
    fig, (reward_ax, length_ax, correct_ax) = plt.subplots(1, 3, figsize=(10.8, 3.0))
    variants = list(trajectories)
    colors = dict(zip(variants, ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]))
    rewards = [r for v in variants for r in trajectories[v]["reward"]]
    lengths = [n for v in variants for n in trajectories[v]["num_tokens"]]
    low, high = (min(rewards), max(rewards)) if rewards else (0.0, 1.0)
    for variant in variants:
        data = trajectories[variant]
        reward_ax.hist(data["reward"], bins=20, range=(low, high if high > low else low + 1), histtype="step",
                       linewidth=1.5, label=variant, color=colors[variant])
        length_ax.hist(data["num_tokens"], bins=20, range=(0, max(lengths + [1])), histtype="step", linewidth=1.5,
                       label=variant, color=colors[variant])
    shares = [sum(trajectories[v]["correct"]) / max(1, len(trajectories[v]["correct"])) for v in variants]
    bars = correct_ax.bar(variants, [100 * s for s in shares], color=[colors[v] for v in variants])
    for bar, share in zip(bars, shares):
        correct_ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), percent(share), ha="center",
                        va="bottom", fontsize=8)
    correct_ax.set_ylim(0, 100)
    reward_ax.set_title("reward")
    length_ax.set_title("length (tokens)")
    correct_ax.set_title("share correct (%)")
    reward_ax.set_ylabel("trajectories")
    reward_ax.legend(fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.88, wspace=0.3)
    return _png(fig)


def plot_pairs(by_type: dict[str, int]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 2.4))
    names, counts = list(by_type), [by_type[n] for n in by_type]
    bars = ax.barh(names[::-1], counts[::-1], color="#8172b3")
    for bar, count in zip(bars, counts[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {count:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(counts + [1]) * 1.2)
    ax.set_xlabel("pairs")
    fig.subplots_adjust(left=0.22, right=0.96, bottom=0.22, top=0.95)
    return _png(fig)


def plot_accuracy(results: dict) -> bytes:
    plt = _pyplot()
    datasets = list(results)
    fig, ax = plt.subplots(figsize=(max(4.8, 2.6 * len(datasets) + 1.6), 3.0))
    models = ordered_models({m: None for by_model in results.values() for m in by_model})
    width = 0.8 / len(models)
    colors = {"base": "#999999", "sft": "#4c72b0", "dpo": "#55a868"}
    later = ["#8172b2", "#c44e52", "#ccb974", "#64b5cd", "#dd8452"]  # dpo-r2, dpo-r3, ...
    for i, model in enumerate(models):
        xs, ys, low, high = [], [], [], []
        for d, dataset in enumerate(datasets):
            row = results[dataset].get(model)
            if row is None:
                continue
            xs.append(d + (i - (len(models) - 1) / 2) * width)
            ys.append(100 * row["accuracy"])
            low.append(100 * (row["accuracy"] - row["ci95"][0]))
            high.append(100 * (row["ci95"][1] - row["accuracy"]))
        if xs:
            color = colors.get(model) or later[(model_round(model) - 2) % len(later)]
            ax.bar(xs, ys, width * 0.92, yerr=[low, high], capsize=3, color=color, label=model_label(model),
                   error_kw={"linewidth": 1})
            for x, y in zip(xs, ys):
                ax.text(x, 1, f"{y:.1f}", ha="center", va="bottom", fontsize=7, color="white")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, frameon=False, ncol=min(len(models), 4), loc="upper left")
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.12, top=0.95)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# report.html

CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}.meta{color:#5b6473;font-size:13px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:6px;padding:4px 18px 14px;margin:14px 0}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{padding:4px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
th{background:#f1f3f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot{display:block;max-width:100%;height:auto;margin:6px 0}
code{font:12px ui-monospace,"DejaVu Sans Mono",monospace;background:#f1f3f6;padding:1px 4px;border-radius:3px}
details{margin:4px 0}summary{cursor:pointer;color:#2a5db0}pre{white-space:pre-wrap;background:#f6f7f9;padding:8px;
border-radius:4px;font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;margin:4px 0}
.good{color:#2e7d32}.bad{color:#c62828}.artifacts td{font-size:12px}.artifacts code{word-break:break-all}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _img(data: bytes, alt: str, name: str) -> str:
    width, height = png_size(data)
    return (f'<img class="plot" data-plot="{_e(name)}" alt="{_e(alt)}" width="{width}" height="{height}" '
            f'data-expected-width="{width}" data-expected-height="{height}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    opening = f'<table class="{cls}">' if cls else "<table>"
    return f"{opening}<tr>{head}</tr>{body}</table>"


def _td(text, num: bool = False, **data) -> str:
    attrs = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items())
    cls = ' class="num"' if num else ""
    return f"<td{cls}{attrs}>{_e(text)}</td>"


def render_html(run: RunArtifacts, timings: dict | None = None, total_seconds: float | None = None) -> str:
    first = next((m for m in run.manifests.values() if m), {}) or {}
    config = first.get("config", {})
    rows = phase_rows(run, timings)
    parts = [f"<h1>Run {_e(run.run_id)}</h1>",
             f'<p class="meta">store <code>{_e(run.store)}</code> · preset <code>{_e(config.get("preset"))}</code> · '
             f'base model <code>{_e(config.get("base_model"))}</code> · '
             f'code <code>{_e(first.get("code_version"))}</code></p>']

    phase_table = _table(["phase", "status", "wall time", "key numbers"],
                         [[_td(r["phase"]), _td(r["status"]), _td(seconds(r["seconds"]), num=True), _td(r["key"])]
                          for r in rows])
    total = "" if total_seconds is None else f"<p>Total wall time of this invocation: {_e(seconds(total_seconds))}</p>"
    plot = _img(plot_wall_times(rows), "wall time per phase", "wall-times") if any(r["seconds"] for r in rows) else ""
    parts.append(f"<section><h2>Phases</h2>{phase_table}{total}{plot}</section>")

    if run.sft_history:
        parts.append("<section><h2>SFT</h2>" + _img(plot_curves(run.sft_history, [("loss", "training loss"),
                                                                                  ("learning_rate", "learning rate")]),
                                                                "SFT loss curve", "sft-loss")
                     + _metrics_line(run.manifests["sft"]) + "</section>")

    if run.trajectories:
        variant_rows = [[_td(v), _td(number(len(d["reward"])), num=True), _td(percent(_mean(d["correct"])), num=True),
                         _td(number(_mean(d["reward"]), 3), num=True), _td(number(_mean(d["num_tokens"]), 3), num=True)]
                        for v, d in run.trajectories.items()]
        parts.append("<section><h2>Rollouts</h2>"
                     + _img(plot_rollouts(run.trajectories), "rollout reward and length per variant", "rollouts")
                     + _table(["variant", "trajectories", "correct", "mean reward", "mean length (tokens)"],
                              variant_rows)
                     + "</section>")

    prefs = (run.manifests.get("preferences") or {}).get("metrics", {})
    if prefs.get("by_type"):
        excluded = prefs.get("excluded_trajectories", {})
        parts.append("<section><h2>Preference pairs</h2>" + _img(plot_pairs(prefs["by_type"]), "pairs by type", "pairs")
                     + f"<p>{_e(number(prefs.get('pairs')))} pairs from "
                     f"{_e(number(prefs.get('questions')))} questions; "
                     f"{_e(number(prefs.get('questions_all_correct')))} questions had only correct trajectories and "
                     f"{_e(number(prefs.get('questions_all_wrong')))} only incorrect ones; excluded trajectories: "
                     + _e(", ".join(f"{k} {v}" for k, v in excluded.items()) or "none") + "</p></section>")

    if run.dpo_history:
        parts.append("<section><h2>DPO</h2>" + _img(plot_curves(run.dpo_history, DPO_SERIES), "DPO curves", "dpo-curves")
            + _metrics_line(run.manifests["dpo"])
            + "".join(f"<h3>Round {r}</h3>" + _img(plot_curves(rows, DPO_SERIES), f"DPO round {r} curves",
                                                   f"dpo-r{r}-curves")
                      + _metrics_line(run.manifests.get(f"round-{r}/dpo"))
                      for r, rows in sorted(run.round_dpo_history.items()))
            + "</section>")

    results = run.eval_summary.get("results", {})
    if results:
        parts.append("<section><h2>Accuracy</h2>" + _img(plot_accuracy(results), "accuracy per dataset and model",
                                                         "accuracy") + _eval_tables(run, results) + "</section>")

    artifact_table = _table(["phase", "file", "location", "size", "SHA-256"],
                            [[_td(r["phase"]), _td(r["name"]), f"<td><code>{_e(r['uri'])}</code></td>",
                              _td(size(r["size"]), num=True), f"<td><code>{_e(r['sha256'])}</code></td>"]
                             for r in artifact_rows(run)], cls="artifacts")
    parts.append("<section><h2>Artifacts</h2><p>Every file as its manifest lists it (the manifest's own line gives "
                 "the digest that later phases record as their input).</p>" + artifact_table + "</section>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>Run {_e(run.run_id)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def _metrics_line(manifest: dict | None) -> str:
    metrics = (manifest or {}).get("metrics", {})
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "<p>" + " · ".join(f"{_e(k.replace('_', ' '))} <b>{_e(number(v))}</b>" for k, v in shown) + "</p>"


def _eval_tables(run: RunArtifacts, results: dict) -> str:
    out = []
    for dataset, by_model in results.items():
        rows = []
        for model in ordered_models(by_model):
            r = by_model[model]
            rows.append([_td(model_label(model)),
                         _td(percent(r["accuracy"]), num=True, metric=f"{dataset}/{model}/accuracy"),
                         _td(f"{percent(r['ci95'][0])} to {percent(r['ci95'][1])}", num=True,
                             metric=f"{dataset}/{model}/ci95"),
                         _td(f"{r['correct']} / {r['total']}", num=True, metric=f"{dataset}/{model}/correct"),
                         _td(number(r.get("truncated", 0)), num=True)])
        out.append(f"<h3>{_e(dataset)}</h3>" + _table(["model", "accuracy", "95% interval", "correct / total",
                                                       "truncated"], rows))
        for before, after in steps(by_model):
            if (dataset, before) not in run.eval_rows or (dataset, after) not in run.eval_rows:
                continue
            fixed, broken = flips(run.eval_rows[(dataset, before)], run.eval_rows[(dataset, after)])
            change = 100 * (by_model[after]["accuracy"] - by_model[before]["accuracy"])
            out.append(f"<p><b>{model_label(before)} → {model_label(after)}</b>: {change:+.1f} points, "
                       f'<span class="good">{len(fixed)} fixed</span>, '
                       f'<span class="bad">{len(broken)} broken</span></p>'
                       + _examples("fixed", fixed, before, after) + _examples("broken", broken, before, after))
        comparisons = paired_rows(run, dataset)
        if comparisons:
            out.append("<p>Paired, on the same questions (95% interval: paired bootstrap; p: exact McNemar):</p>"
                       + _table(["comparison", "difference", "paired 95% interval", "fixed", "broken", "McNemar p"], [
                           [_td(f"{model_label(c['before'])} → {model_label(c['after'])}"),
                            _td(points(c["difference"]), num=True,
                                metric=f"{dataset}/{c['before']}->{c['after']}/difference"),
                            _td(f"{points(c['ci95'][0])} to {points(c['ci95'][1])}", num=True),
                            _td(number(c["fixed"]), num=True), _td(number(c["broken"]), num=True),
                            _td(p_value(c.get("mcnemar_p")), num=True)] for c in comparisons]))
    return "".join(out)


def paired_rows(run: RunArtifacts, dataset: str) -> list[dict]:
    """eval's paired comparisons on `dataset` (summary.json["paired"]), in its order; [] when absent."""
    return [c for c in run.eval_summary.get("paired", {}).get(dataset, {}).values() if isinstance(c, dict)]


def points(difference) -> str:
    return f"{100 * difference:+.1f} pts"


def p_value(p) -> str:
    return "–" if p is None else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


def _examples(kind: str, pairs: list[tuple[dict, dict]], before: str, after: str) -> str:
    if not pairs:
        return ""
    items = []
    for b, a in pairs[:EXAMPLES_PER_FLIP]:
        items.append(f"<details><summary>{_e(_short(b.get('question', '')))} (gold {_e(b.get('gold'))}: "
                     f"{model_label(before)} {_e(b.get('answer'))}, "
                     f"{model_label(after)} {_e(a.get('answer'))})</summary>"
                     f"<p>{_e(b.get('question', ''))}</p>"
                     f"<p><b>{model_label(before)}</b></p><pre>{_e(b.get('prediction', ''))}</pre>"
                     f"<p><b>{model_label(after)}</b></p><pre>{_e(a.get('prediction', ''))}</pre></details>")
    rest = len(pairs) - EXAMPLES_PER_FLIP
    more = f"<p>… and {rest} more in the eval artifact.</p>" if rest > 0 else ""
    return (f'<details class="flips" data-kind="{kind}"><summary>{len(pairs)} questions {kind} '
            f"(first {min(len(pairs), EXAMPLES_PER_FLIP)})</summary>{''.join(items)}{more}</details>")


def _mean(values: list) -> float:
    return sum(values) / max(1, len(values))


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
