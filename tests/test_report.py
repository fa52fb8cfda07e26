"""The bench report: Markdown / HTML from a summary, hostile text escaped, every image loads in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def fake_results(out: Path, concept: str = "star", methods=("original", "uce"), prompt: str = "a star",
                 scenarios=("text", "latent-bb")) -> tuple[dict, list[dict]]:
    """A results folder's summary and rows without a model: random PNGs, made-up scores."""
    from erasekit.bench.plan import PRESERVATION
    from erasekit.bench.results import cost_table, crr_table
    from erasekit.bench.layout import image_path
    from erasekit.bench.spec import BenchConfig, ConceptConfig, MethodConfig, to_dict

    rng = np.random.default_rng(0)
    rows = []
    for m in methods:
        for s in [*scenarios, PRESERVATION]:
            for i in range(4):
                key = f"{abs(hash((m, s, i))):016x}"[:16]
                path = out / image_path(key)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
                rows.append({"row": f"{concept}/{m}/{s}#{i}", "image": key, "path": image_path(key), "concept": concept,
                             "method": m, "scenario": s, "kind": "preservation" if s == PRESERVATION else "attack",
                             "index": i, "prompt": prompt, "present": bool(i % 2), "label": "circle",
                             "label_present": True, "score": 0.5})
    cfg = BenchConfig(concepts=[ConceptConfig(concept)], methods=[MethodConfig(m, edit="original") for m in methods],
                      scenarios=list(scenarios), description=prompt)
    summary = {"config_key": "k", "config": to_dict(cfg), "provenance": {"erasekit": "0"}, "methods": list(methods),
               "scenarios": list(scenarios), "concepts": [concept], "images": len(rows),
               "tables": {"crr": crr_table(rows),
                          "preservation": {concept: {m: {"following": {"crr": 1.0, "ci": [0.5, 1.0], "n": 4, "k": 4},
                                                         "relative": 1.0, "drawn_as_concept": None, "fd": 1.5, "n": 4}
                                                     for m in methods}},
                          "costs": cost_table([{"run": "r", "stage": "generation", "wall_s": 1.0, "cpu_s": 2.0,
                                                "images": 8, "unet_evals": 80}])},
               "cells": {}, "edits": {}}
    return summary, rows


def test_markdown_table_has_intervals(tmp_path):
    from erasekit.report.markdown import crr_markdown

    summary, _ = fake_results(tmp_path)
    text = crr_markdown(summary)
    assert "| star: method | text | latent-bb |" in text
    assert "| uce | 50% [15-85] | 50% [15-85] |" in text


def parsed_tags(html: str) -> list[tuple[str, list]]:
    from html.parser import HTMLParser

    tags = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, attrs))

    Parser().feed(html)
    return tags


def test_hostile_text_is_escaped(tmp_path):
    from erasekit.report import write_report

    summary, rows = fake_results(tmp_path, concept="star", methods=("original", HOSTILE), prompt=HOSTILE)
    write_report(tmp_path, summary, rows)
    html = (tmp_path / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    tags = parsed_tags(html)
    assert "script" not in {t for t, _ in tags}
    assert not [a for _, attrs in tags for a, _ in attrs if a.startswith("on")]  # no event handler got through
    md = (tmp_path / "report.md").read_text()
    assert "<script>" not in md


def test_images_are_relative(tmp_path):
    from erasekit.report import write_report

    summary, rows = fake_results(tmp_path)
    write_report(tmp_path, summary, rows)
    html = (tmp_path / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert sources and all(not s.startswith(("/", "file:", "http")) for s in sources)
    assert all((tmp_path / s).is_file() for s in sources)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  document.title = 'IMAGES ' + imgs.length + ' BROKEN ' + broken.length;
});
</script>"""


def browser_check(report: Path, timeout: int = 120) -> dict:
    """Open ``report`` in headless Chromium: number of images, broken images, console errors, screenshot path."""
    browser = _chromium()
    probe = report.with_name("_browser_check.html")
    probe.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    try:
        dom = subprocess.run([*args, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=timeout)
        shot = report.with_name("_screenshot.png")
        subprocess.run([*args, f"--screenshot={shot}", "--window-size=1400,3000", report.as_uri()],
                       capture_output=True, text=True, timeout=timeout)
    finally:
        probe.unlink(missing_ok=True)
    title = re.search(r"<title>IMAGES (\d+) BROKEN (\d+)</title>", dom.stdout)
    console = [line for line in dom.stderr.splitlines()
               if "CONSOLE" in line or "Failed to load resource" in line or "Uncaught" in line]
    return {"images": int(title.group(1)) if title else None, "broken": int(title.group(2)) if title else None,
            "console_errors": console, "screenshot": shot if shot.is_file() else None}


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_in_headless_chromium(tmp_path):
    from erasekit.report import write_report

    summary, rows = fake_results(tmp_path, prompt=HOSTILE)
    write_report(tmp_path, summary, rows)
    result = browser_check(tmp_path / "report.html")
    assert result["images"] and result["images"] >= 3, result
    assert result["broken"] == 0, result
    assert result["console_errors"] == [], result
    assert result["screenshot"] is not None


def test_rebuild_refuses_other_folders(tmp_path):
    from erasekit.bench.results import rebuild
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError, match="not a bench results folder"):
        rebuild(tmp_path)
    with pytest.raises(ErasekitError, match="no such folder"):
        rebuild(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"config": {"bogus": 1}}))
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ErasekitError, match="bogus"):
        rebuild(tmp_path)
