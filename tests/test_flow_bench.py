"""`erasekit bench` unchanged on tiny SD3 and FLUX.1 folders: every eraser, defence and attack scenario that runs on
flow-matching transformers, through the command line, one row per image (#22)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

METHODS = """
  - name: original
  - name: uce
  - name: esd-x
    settings: {iterations: 2}
  - name: rece+irece
    edit: rece
    settings: {epochs: 1}
    defences: [irece]
  - name: sld
    edit: original
    defences: [sld]
"""
SCENARIOS = ["text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb"]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_bench_runs_every_flow_cell_from_the_command_line(kind, tmp_path):
    from erasekit.models.tiny_flow import save_tiny_flow_pipeline
    from erasekit.models.tiny_judges import clip_folder

    model = save_tiny_flow_pipeline(kind, tmp_path / kind)
    judge = clip_folder(tmp_path / "clip")
    images = tmp_path / "car"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"car-{i}.png")
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(f"model: {model}\nconcepts:\n  - name: car\n    images: {images}\nmethods:{METHODS}"
                   f"scenarios: [{', '.join(SCENARIOS)}]\nimages_per_cell: 2\nseed: 0\n"
                   "sampler: {steps: 2, guidance: null}\nbatch_size: 4\npreservation: {enabled: false}\n"
                   f"detector: {{name: clip, settings: {{model: {judge}}}}}\nattacks:\n  ti: {{steps: 2}}\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "erasekit", "bench", "--preset", str(cfg), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cells = {(r["method"], r["scenario"]) for r in rows}
    methods = ["original", "uce", "esd-x", "rece+irece", "sld"]
    assert cells == {(m, s) for m in methods for s in SCENARIOS}
    assert len(rows) == len(methods) * len(SCENARIOS) * 2
    assert all((out / r["path"]).is_file() for r in rows)
    # the flow defaults of the family's world, not the SD world's 7.5
    assert {r["guidance"] for r in rows} == {3.5 if kind == "flux" else 7.0}
    assert "rece+irece" in (out / "report.md").read_text()
