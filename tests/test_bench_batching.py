"""The bench's generation at the speed of standalone generation (#23): batches shared across cells of one model
state give the per-cell images byte for byte (same keys, same PNGs), padded batches keep one UNet shape, ``fast:
auto`` follows its stated rule, and compilation is cached on disk where the run says."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


def _parts(pipe):
    """Three inputs of one target: plain prompts with per-item guidance, a learned token, given start latents (and
    one image the first and the last part share: one key)."""
    from erasekit.attacks.textual_inversion import LearnedEmbedding
    from erasekit.generation import GenerationInputs, initial_latents

    width = pipe.text_encoder.config.hidden_size
    learned = LearnedEmbedding("<bb-tok>", torch.randn(1, width, generator=torch.Generator().manual_seed(3)) * 0.1)
    plain = GenerationInputs(["a red star", "a heart", "a blue circle", "a star"], [0, 1, 2, 3],
                             guidance=[None, None, 3.0, None])
    tok = GenerationInputs([learned.prompt()] * 3, [10, 11, 12], learned=learned)
    lat = initial_latents(pipe, [40, 41, 42]) * 0.9
    given = GenerationInputs(["", "a star", "a red star"], [20, 21, 0], latents=lat)
    shared = GenerationInputs(["a star"], [3])  # the plain part's last image again
    return [plain, tok, given, shared]


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.rglob("*.png")}


def test_shared_batches_give_the_per_cell_images_byte_for_byte(tiny_sd1, tmp_path):
    from erasekit.generation import generate_parts_to_dir, generate_to_dir

    pipe = tiny_sd1
    parts = _parts(pipe)
    per_cell, made_cell = [], 0
    for inputs in parts:
        recs, n = generate_to_dir(pipe, inputs, tmp_path / "cell", steps=3, batch_size=2, progress=False,
                                  keyed_names=True, grid=False)
        per_cell.append(recs)
        made_cell += n
    shared, made = generate_parts_to_dir(pipe, parts, tmp_path / "shared", steps=[3] * 4, batch_size=4,
                                         progress=False, keyed_names=True, pad=True)
    assert made == made_cell == 10  # 11 items, one image shared by two parts: generated once
    assert [[r["key"] for r in p] for p in shared] == [[r["key"] for r in p] for p in per_cell]
    assert [[r["path"] for r in p] for p in shared] == [[r["path"] for r in p] for p in per_cell]
    a, b = _pngs(tmp_path / "cell"), _pngs(tmp_path / "shared")
    assert len(a) == 10 and a == b  # the same files, byte for byte
    again, made = generate_parts_to_dir(pipe, parts, tmp_path / "shared", steps=[3] * 4, batch_size=3,
                                        progress=False, keyed_names=True)
    assert made == 0 and [[r["key"] for r in p] for p in again] == [[r["key"] for r in p] for p in shared]


def test_padded_batches_keep_one_unet_shape(tiny_sd1, tmp_path):
    """Rows of every part fill each batch and the last one is padded: the UNet sees 2 x batch_size rows (CFG) at
    every call, whatever the parts' sizes; without padding the remainder is a second shape."""
    from erasekit.generation import GenerationInputs, generate_parts_to_dir

    pipe = tiny_sd1
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: sizes.append(int((a[0] if a else k["sample"]).shape[0])),
                                                 with_kwargs=True)
    parts = [GenerationInputs(["a star"] * 3, [0, 1, 2]), GenerationInputs(["a heart"] * 2, [5, 6]),
             GenerationInputs(["a circle"], [9])]
    try:
        _, made = generate_parts_to_dir(pipe, parts, tmp_path / "a", steps=[2] * 3, batch_size=4, progress=False,
                                        pad=True)
        assert made == 6 and set(sizes) == {8} and len(sizes) == 2 * 2  # two batches of 4 (6 + 2 padding), 2 steps
        sizes.clear()
        generate_parts_to_dir(pipe, parts, tmp_path / "b", steps=[2] * 3, batch_size=4, progress=False, pad=False)
        assert sorted(set(sizes)) == [4, 8]
    finally:
        handle.remove()
    # the padding rows never reach the store
    from erasekit.image_store import read_index

    assert len(read_index(tmp_path / "a")) == 6 and len(list((tmp_path / "a").rglob("*.png"))) == 6


def test_a_defence_in_shared_batches_keeps_its_shape_and_images(tiny_sd1, tmp_path):
    """IRECE (extra UNet calls per step, per-row masks and noise): shared padded batches give the per-cell images,
    and its own UNet calls keep one shape too."""
    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target
    from erasekit.generation import GenerationInputs, generate_parts_to_dir, generate_to_dir

    target = Target(tiny_sd1, model="tiny").with_defences(parse_defence("irece:concept=star"))
    parts = [GenerationInputs(["a star", "a red star", "a heart"], [0, 1, 2]),
             GenerationInputs(["a star on stripes"], [7])]
    for p in parts:
        generate_to_dir(target, p, tmp_path / "cell", steps=3, batch_size=3, progress=False, keyed_names=True,
                        grid=False)
    sizes = []
    handle = tiny_sd1.unet.register_forward_pre_hook(
        lambda m, a, k: sizes.append(int((a[0] if a else k["sample"]).shape[0])), with_kwargs=True)
    try:
        generate_parts_to_dir(target, parts, tmp_path / "shared", steps=[3, 3], batch_size=2, progress=False,
                              keyed_names=True, pad=True)
    finally:
        handle.remove()
    assert set(sizes) <= {2, 4} and 2 in sizes  # IRECE's own calls at 2 rows, guidance at 4: never the remainder
    assert _pngs(tmp_path / "cell") == _pngs(tmp_path / "shared")


def test_batching_rule_and_which_defences_share():
    from erasekit.bench.stages import resolve_batching, shares_batches
    from erasekit.defences import parse_defence

    assert resolve_batching("auto", "cpu", False) == "cell"  # the CPU path of before
    assert resolve_batching("auto", "cpu", True) == "shared" and resolve_batching("auto", "cuda", False) == "shared"
    assert resolve_batching("cell", "cuda", True) == "cell"

    class T:
        def __init__(self, *d):
            self.defences = [parse_defence(x) for x in d]

    assert shares_batches(T()) and shares_batches(T("irece:concept=star", "negative_prompt:text=star"))
    # decides per batch (whether any prompt names the concept): its cells keep their own batches
    assert not shares_batches(T("dual_reconstruction:concept=star"))


def test_auto_fast_rule():
    """Compiled on CUDA once the UNet rows repay a cold compilation (issue 23's H200 figures: 95 s against
    1/3.29 - 1/4.55 s saved per 50-step CFG image: 1129 images), eager on the CPU whatever the size."""
    from erasekit.diffusion.speed import AUTO_FAST_UNET_ROWS, auto_fast

    saved = 1 / 3.29 - 1 / 4.55
    assert abs(95 / saved * 100 - AUTO_FAST_UNET_ROWS) < 0.01 * AUTO_FAST_UNET_ROWS
    assert auto_fast("cuda", 1130, 50, 7.5)[0] and not auto_fast("cuda", 1000, 50, 7.5)[0]
    assert not auto_fast("cuda", 1130, 25, 7.5)[0] and auto_fast("cuda", 2260, 25, 7.5)[0]  # fewer steps: more images
    assert not auto_fast("cuda", 1500, 50, 1.0)[0]  # no CFG: one UNet row an image-step
    assert auto_fast("cpu", 10**6, 50, 7.5) == (False, "eager: not on CUDA")


def test_fast_auto_in_bench_configs():
    from erasekit.bench.layout import config_key
    from erasekit.bench.plan import planned_images, resolve_fast
    from erasekit.bench.spec import BenchConfig, parse_config

    raw = {"model": "toy", "concepts": ["star"], "methods": ["original", "uce"], "scenarios": ["text", "latent-wb"],
           "images_per_cell": 300}
    cfg = parse_config(raw)
    assert cfg.fast == "auto" and BenchConfig().fast == "auto"  # the default
    assert planned_images(cfg) == 2 * 2 * 300 + 2 * 300 + 300  # four attack cells, two preservation, reference
    cpu, why = resolve_fast(cfg, "cpu", 50, 7.5)
    assert cpu.fast is False and why["setting"] == "auto" and why["chosen"] is False
    assert config_key(cpu) == config_key(parse_config(dict(raw, fast=False)))  # eager keys as before
    gpu, why = resolve_fast(cfg, "cuda", 50, 7.5)
    assert gpu.fast is True and why["chosen"] is True and config_key(gpu) == config_key(parse_config(dict(raw, fast=True)))
    small, _ = resolve_fast(parse_config(dict(raw, images_per_cell=20)), "cuda", 50, 7.5)
    assert small.fast is False
    assert resolve_fast(parse_config(dict(raw, fast=True)), "cpu", 50, 7.5)[0].fast is True  # explicit wins
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError, match="fast must be"):
        parse_config(dict(raw, fast="sometimes"))
    with pytest.raises(ErasekitError, match="batching must be"):
        parse_config(dict(raw, batching="rows"))


def test_compile_cache_folder(tmp_path, monkeypatch):
    """Inductor's caches go where the run says (the bench's compile_cache, else ERASEKIT_COMPILE_CACHE, else one
    folder per user), set before `accelerate` compiles anything; a process's own TORCHINDUCTOR_CACHE_DIR is kept."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from erasekit.diffusion import speed
    from erasekit.models.tiny import tiny_sd_pipeline

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv(speed.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert speed.default_compile_cache() == tmp_path / "xdg" / "erasekit" / "inductor"
    monkeypatch.setenv(speed.CACHE_ENV, str(tmp_path / "mine"))
    assert speed.default_compile_cache() == tmp_path / "mine"
    pipe = tiny_sd_pipeline("sd1")
    speed.accelerate(pipe, speed.SpeedOptions(backend="aot_eager"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "mine")  # what inductor itself reads
    assert speed.use_compile_cache() == tmp_path / "mine"  # already chosen by the process: kept
    assert speed.use_compile_cache(tmp_path / "bench") == tmp_path / "bench"  # a run's own folder wins
    assert speed.compile_stats()["cache_dir"] == str(tmp_path / "bench")


@pytest.mark.slow  # two tiny benches, one traced by dynamo: about 10 s on an idle 2-core machine
def test_fast_bench_records_its_choice_compilation_and_cache(tmp_path, monkeypatch):
    """A tiny bench with ``fast: true`` (aot_eager, as the other CPU tests compile): shared, padded batches, the
    config's compile_cache in force before generation, compile seconds and graph counts in costs.jsonl and the
    summary; the same images as the eager per-cell bench up to 1 level (fast images are keyed apart)."""
    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.jsonl import read_jsonl
    from erasekit.models import load_pipeline

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    raw = {"model": "toy", "concepts": ["star"], "methods": ["original", {"name": "uce", "preserve": "none"}],
           "scenarios": ["text"], "images_per_cell": 3, "sampler": {"steps": 2}, "preservation": {"enabled": False},
           "batch_size": 4, "fast": True, "compile_cache": str(tmp_path / "inductor")}
    pipe = load_pipeline("toy")
    accelerate(pipe, SpeedOptions(backend="aot_eager"))
    summary = run_bench(parse_config(raw), tmp_path / "fast", progress=False, log=lambda m: None, pipeline=pipe)
    gen = [r for r in read_jsonl(tmp_path / "fast" / "costs.jsonl") if r["stage"] == "generation"][-1]
    assert gen["batching"] == "shared" and gen["fast"] == {"setting": True, "chosen": True, "why": "set in the config"}
    assert gen["compile"]["graphs"] >= 1 and gen["compile"]["compile_s"] > 0
    assert gen["compile"]["cache_dir"] == str(tmp_path / "inductor") and (tmp_path / "inductor").is_dir()
    assert summary["last_run"]["fast"]["chosen"] is True and summary["last_run"]["batching"] == "shared"
    eager = run_bench(parse_config(dict(raw, fast=False)), tmp_path / "eager", progress=False, log=lambda m: None)
    assert eager["last_run"]["batching"] == "cell" and "compile" not in eager["last_run"]
    from PIL import Image

    fast_rows = {r["row"]: r for r in read_jsonl(tmp_path / "fast" / "results.jsonl")}
    for r in read_jsonl(tmp_path / "eager" / "results.jsonl"):
        f = fast_rows[r["row"]]
        assert f["image"] != r["image"]
        a = np.asarray(Image.open(tmp_path / "eager" / r["path"]), dtype=int)
        b = np.asarray(Image.open(tmp_path / "fast" / f["path"]), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_defence_calls_go_through_the_compiled_unet_in_fast_mode(tmp_path):
    """IRECE's guide call and SLD's safety branch beside another defence's wrapper use the fast UNet (compiled, one
    shape per row count), with the eager images up to 1 level (IRECE's mask call too: test_defences)."""
    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.generation import generate
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    target = Target(pipe, model="tiny").with_defences(parse_defence("dual_reconstruction:concept=star,threshold=2"),
                                                      parse_defence("sld:concept=star"),
                                                      parse_defence("irece:concept=star,kind=guide"))
    eager = generate(target, ["a star", "a red star"], [0, 1], steps=4, progress=False)
    fast_unet = accelerate(pipe, SpeedOptions(backend="aot_eager"))
    fast = generate(target, ["a star", "a red star"], [0, 1], steps=4, progress=False, fast=True)
    rows = {size for _, size in fast_unet.batch_sizes}
    assert 2 in rows  # IRECE's guide call and SLD's safety branch: one row an image, through the fast UNet
    assert np.abs(eager.astype(int) - fast).max() <= 1


def test_the_gpu_bench_config_is_a_valid_bench_config(tmp_path):
    """scripts/bench_gpu.py --bench's fixed config (issue 23's: four methods, the five scenarios, 32 images a cell,
    textual inversion 200 steps, batch 64) parses, and plans 640 images."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_gpu_bench import bench_config

    from erasekit.bench.plan import planned_images
    from erasekit.bench.spec import parse_config

    cfg = parse_config(bench_config(tmp_path, False, True))
    assert [m.name for m in cfg.methods] == ["original", "uce", "rece", "rece+irece"] and len(cfg.scenarios) == 5
    assert cfg.images_per_cell == 32 and cfg.attacks["ti"]["steps"] == 200 and cfg.batch_size == 64
    assert cfg.fast is True and planned_images(cfg) == 4 * 5 * 32
    assert parse_config(bench_config(tmp_path, True, "auto")).fast == "auto"


def test_generate_cli_fast_is_auto_and_eager_on_the_cpu(tmp_path, monkeypatch):
    """`erasekit generate` without --fast: auto, which samples eagerly on the CPU (the records say so); the rule
    is asked with the run's device, image count, steps and guidance; --no-fast never asks."""
    import json

    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.diffusion import speed

    asked = []
    real = speed.auto_fast
    monkeypatch.setattr(speed, "auto_fast", lambda *a: asked.append(a) or real(*a))
    args = ["generate", "a star", "a heart", "-n", "2", "--steps", "2", "--model", "toy"]
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert len(asked) == 1 and str(asked[0][0]) == "cpu" and asked[0][1:] == (4, 2, 5.0)
    rows = [json.loads(line) for line in (tmp_path / "a" / "images.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any(r.get("fast") for r in rows)
    result = CliRunner().invoke(app, args + ["--no-fast", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0 and len(asked) == 1


def test_padded_batch_size_pads_least():
    """One padded shape for a run: the configured batch or a halving, whichever runs fewest rows plus a batch's
    fixed cost (issue 23's bench: 96 and 3 x 160 images a model state pad 18% of the rows at 64, none at 32)."""
    from erasekit.generation import padded_batch_size

    assert padded_batch_size([96, 160, 160, 160], 64) == 32
    assert padded_batch_size([128, 128, 64], 64) == 64  # nothing to pad: the largest
    assert padded_batch_size([6], 4) == 4 and padded_batch_size([], 64) == 64
    assert padded_batch_size([3], 64, smallest=8) == 8  # never below `smallest`
    assert padded_batch_size([100], 48) in (48, 24, 12)  # halvings of the configured batch only


def test_fast_auto_resumes_a_folder_as_it_ran(tmp_path):
    """``fast: auto`` on a folder an earlier run made: that run's resolved choice (its images' keys say fast or
    eager), not the rule again: a folder made before auto existed (fast: false) resumes eagerly on a GPU too."""
    import json

    from erasekit.bench.run import _folder_fast

    assert _folder_fast(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"config_key": "k", "config": {"fast": True}}))
    assert _folder_fast(tmp_path) is True
    (tmp_path / "config.json").write_text(json.dumps({"config_key": "k", "config": {"model": "toy"}}))
    assert _folder_fast(tmp_path) is False  # written before fast mode existed
    (tmp_path / "config.json").write_text("{not json")
    assert _folder_fast(tmp_path) is None


def test_png_writer_threads_write_what_save_images_writes(tmp_path):
    """On a GPU the PNGs of a batch are written on threads while the next batch samples: the same files and index
    rows as `save_images` in line, rows only after their PNGs, and a worker's error raised to the caller."""
    from erasekit.generation import BatchWriter
    from erasekit.image_store import keyed_filename, read_index, record_key

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8) for _ in range(4)]
    recs = [[{"prompt": f"p{b}-{i}", "seed": i} for i in range(3)] for b in range(4)]
    for r in (r for batch in recs for r in batch):
        r["path"] = keyed_filename(record_key(r))
    out = {}
    for workers in (0, 2):
        done: dict = {}
        with BatchWriter(tmp_path / str(workers), "images.jsonl", done, workers=workers) as w:
            for images, rs in zip(batches, recs):
                w.submit(images, rs)
        assert len(done) == 12
        out[workers] = ({p.relative_to(tmp_path / str(workers)): p.read_bytes()
                         for p in (tmp_path / str(workers)).rglob("*.png")}, read_index(tmp_path / str(workers)))
    assert out[0][0] == out[2][0] and len(out[0][0]) == 12
    assert {k: dict(v, path=None) for k, v in out[0][1].items()} == {k: dict(v, path=None) for k, v in out[2][1].items()}
    blocked = tmp_path / "blocked"
    (blocked / recs[0][0]["path"]).mkdir(parents=True)  # a folder where a PNG should go: the write fails
    with pytest.raises(Exception):
        with BatchWriter(blocked, "images.jsonl", {}, workers=2) as w:
            w.submit(batches[0], recs[0])
    assert not (blocked / "images.jsonl").exists() or recs[0][0]["prompt"] not in (blocked / "images.jsonl").read_text()
