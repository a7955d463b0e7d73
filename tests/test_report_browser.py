"""The small run's report.html rendered in a real browser (headless Chromium, Debian's package).

    python -m pytest tests/test_report_browser.py -q     # scripts/test.sh installs chromium first

Chromium loads a copy of the page with one added script that, once the page has loaded,
writes what the browser rendered into attributes (each image's natural size, whether it
decoded, how many distinct colours a canvas copy of it has, the text of each accuracy cell);
`--dump-dom` prints the DOM after that, which the test parses. So "every plot drew" is the
browser's word, not a regex over our own HTML.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from app import artifacts
from app.cli import main as cli_main

PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.querySelectorAll("img")) {
    img.setAttribute("data-rendered-width", img.naturalWidth);
    img.setAttribute("data-rendered-height", img.naturalHeight);
    img.setAttribute("data-complete", img.complete);
    try {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      const context = canvas.getContext("2d");
      context.drawImage(img, 0, 0);
      const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
      const colours = new Set();
      for (let i = 0; i < pixels.length && colours.size < 64; i += 4 * 97) {
        colours.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
      }
      img.setAttribute("data-colours", colours.size);
    } catch (error) {
      img.setAttribute("data-colours", "error: " + error);
    }
  }
  for (const cell of document.querySelectorAll("td[data-metric]")) {
    cell.setAttribute("data-rendered-text", cell.innerText);
  }
  document.body.setAttribute("data-probed", "yes");
});
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--virtual-time-budget=10000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (scripts/test.sh installs Debian's package as root)")


class Elements(HTMLParser):
    """The attributes of every <img>, <td data-metric> and <body> in a DOM dump."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.body = [], {}, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "td" and "data-metric" in attrs:
            self.cells[attrs["data-metric"]] = attrs
        elif tag == "body":
            self.body = attrs


def render(page_path, tmp_path) -> Elements:
    probed = tmp_path / "probed.html"
    probed.write_text(page_path.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "profile"
    profile.mkdir()
    result = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                             probed.as_uri()], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    elements = Elements()
    elements.feed(result.stdout)
    assert elements.body.get("data-probed") == "yes", "the probe did not run: " + result.stderr[-2000:]
    return elements


def test_every_plot_draws_and_the_accuracies_match_summary_json(small_run, tmp_path):
    store, run_id, _ = small_run
    assert cli_main(["report", "--store", str(store), "--run-id", run_id]) == 0
    elements = render(store / "runs" / run_id / "report.html", tmp_path)

    assert len(elements.images) == 6
    for img in elements.images:
        name = img["data-plot"]
        assert img["data-complete"] == "true", name
        assert (img["data-rendered-width"], img["data-rendered-height"]) == \
            (img["data-expected-width"], img["data-expected-height"]), name
        assert int(img["data-rendered-width"]) >= 400, name
        assert img["data-colours"].isdigit() and int(img["data-colours"]) >= 3, f"{name}: blank ({img['data-colours']})"

    path, _ = artifacts.fetch(artifacts.phase_uri(str(store), run_id, "eval"))
    results = json.loads((path / "summary.json").read_text())["results"]
    shown = 0
    for dataset, by_model in results.items():
        for model, row in by_model.items():
            cells = elements.cells
            assert cells[f"{dataset}/{model}/accuracy"]["data-rendered-text"] == f"{100 * row['accuracy']:.1f}%"
            assert cells[f"{dataset}/{model}/correct"]["data-rendered-text"] == f"{row['correct']} / {row['total']}"
            low, high = row["ci95"]
            assert cells[f"{dataset}/{model}/ci95"]["data-rendered-text"] == f"{100 * low:.1f}% to {100 * high:.1f}%"
            shown += 1
    assert shown == sum(len(by_model) for by_model in results.values()) > 0
