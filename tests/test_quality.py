"""Quality metrics on tiny random models saved to folders: CLIP score, Fréchet distance, KID, against torchmetrics."""

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    from erasekit.models.tiny_judges import clip_folder, dinov2_folder

    root = tmp_path_factory.mktemp("quality-judges")
    return {"clip": clip_folder(root / "clip"), "dinov2": dinov2_folder(root / "dinov2")}


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class _TensorCLIP(torch.nn.Module):
    """CLIPModel whose feature calls return tensors (torchmetrics 1.9 expects transformers 4's return type)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_image_features(self, *a, **k):
        return self.inner.get_image_features(*a, **k).pooler_output

    def get_text_features(self, *a, **k):
        return self.inner.get_text_features(*a, **k).pooler_output


def test_clip_score_equals_torchmetrics(judges):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    from erasekit.metrics.clip_score import ClipScorer, summarize

    images = _images(6)
    prompts = ["a photo of a cat", "a red star", "a dog", "a painting of a church", "van gogh", "a car"]
    scorer = ClipScorer(str(judges["clip"]), device="cpu", batch_size=4)  # two batches
    ours = scorer.scores(images, prompts)
    model = CLIPModel.from_pretrained(str(judges["clip"]), local_files_only=True, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(str(judges["clip"]), local_files_only=True)
    theirs = clip_score(torch.from_numpy(images).permute(0, 3, 1, 2), prompts,
                        model_name_or_path=lambda: (_TensorCLIP(model), processor))
    assert summarize(ours)["mean"] == pytest.approx(max(float(theirs), 0.0), abs=1e-3)
    for i in range(2):  # per image too
        one = clip_score(torch.from_numpy(images[i : i + 1]).permute(0, 3, 1, 2), prompts[i : i + 1],
                         model_name_or_path=lambda: (_TensorCLIP(model), processor))
        assert ours[i] == pytest.approx(float(one), abs=1e-3) or float(one) == 0.0
    assert scorer.info()["model_fingerprint"] and len(scorer.info()["model_fingerprint"]) == 16


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_frechet_distance_is_zero_on_itself_and_equals_torchmetrics(judges, kind):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from erasekit.metrics.features import feature_extractor
    from erasekit.metrics.frechet import frechet_distance

    ext = feature_extractor(kind, str(judges[kind]), device="cpu", batch_size=16)
    real, fake = _images(40, seed=1), _images(36, seed=2)
    fr, ff = ext.extract(real), ext.extract(fake)
    assert fr.shape == (40, ext.num_features) and fr.dtype == np.float64
    assert frechet_distance(fr, fr) == pytest.approx(0.0, abs=1e-6)
    ours = frechet_distance(fr, ff)
    fid = FrechetInceptionDistance(feature=ext, normalize=False, sync_on_compute=False)
    fid.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    fid.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    assert ours > 0 and ours == pytest.approx(float(fid.compute()), rel=1e-6, abs=1e-8)
    assert frechet_distance(fr[:1], ff) is None


def test_kid_equals_torchmetrics_on_one_full_subset(judges):
    from torchmetrics.image.kid import KernelInceptionDistance

    from erasekit.metrics.features import feature_extractor
    from erasekit.metrics.frechet import kernel_distance

    ext = feature_extractor("dinov2", str(judges["dinov2"]), device="cpu")
    real, fake = _images(20, seed=3), _images(20, seed=4)
    ours = kernel_distance(ext.extract(real), ext.extract(fake), subsets=1, subset_size=20)
    kid = KernelInceptionDistance(feature=ext, subsets=1, subset_size=20, normalize=False, sync_on_compute=False)
    kid.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    kid.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    mean, _ = kid.compute()
    assert ours["mean"] == pytest.approx(float(mean), rel=1e-6, abs=1e-10)
    again = kernel_distance(ext.extract(real), ext.extract(fake), subsets=5, subset_size=10, seed=1)
    assert again == kernel_distance(ext.extract(real), ext.extract(fake), subsets=5, subset_size=10, seed=1)
    assert again["subset_size"] == 10 and again["std"] > 0  # seeded subsets: reproducible, and they differ


def test_toy_features_give_the_bench_fd_of_before():
    """On the embedded world the extractor is its detector, as bench/results.py computed it."""
    from erasekit.bench.results import frechet_distance as bench_fd
    from erasekit.metrics.features import feature_extractor
    from erasekit.metrics.frechet import frechet_distance

    a, b = _images(12, seed=5), _images(10, seed=6)
    ext = feature_extractor("toy", device="cpu")
    from erasekit.worlds import TOY_WORLD

    assert round(frechet_distance(ext.extract(a), ext.extract(b)), 4) == pytest.approx(
        bench_fd(a, b, TOY_WORLD.frechet_features()), abs=2e-4)


def test_feature_extractor_errors(tmp_path, judges):
    from erasekit.metrics.features import feature_extractor

    with pytest.raises(ErasekitError, match="unknown feature extractor 'inception'"):
        feature_extractor("inception")
    with pytest.raises(ErasekitError, match="no such folder"):
        feature_extractor("dinov2", str(tmp_path / "missing"))
    with pytest.raises(ErasekitError, match="no model given"):
        feature_extractor("dinov2", None)


def test_coco_prompt_csv_and_reference_images(tmp_path):
    from PIL import Image

    from erasekit.metrics.coco import load_prompt_csv, reference_images

    csv = tmp_path / "coco.csv"
    csv.write_text("image_id,prompt,evaluation_seed\n139,a cat on a sofa,7\n285,\"a bear, sitting\",8\n", encoding="utf-8")
    rows = load_prompt_csv(csv)
    assert rows == [{"prompt": "a cat on a sofa", "seed": 7, "image_id": "139"},
                    {"prompt": "a bear, sitting", "seed": 8, "image_id": "285"}]
    folder = tmp_path / "val"
    folder.mkdir()
    Image.fromarray(_images(1, 40)[0]).save(folder / "000000000139.jpg")
    Image.fromarray(_images(1, 30)[0]).save(folder / "285.png")
    arr, names = reference_images(folder, size=32, ids=[r["image_id"] for r in rows])
    assert arr.shape == (2, 32, 32, 3) and names == ["000000000139.jpg", "285.png"]
    with pytest.raises(ErasekitError, match="no reference image for image_id 999"):
        reference_images(folder, size=32, ids=["999"])
    bad = tmp_path / "bad.csv"
    bad.write_text("caption,seed\nx,1\n", encoding="utf-8")
    with pytest.raises(ErasekitError, match="needs a 'prompt' column"):
        load_prompt_csv(bad)


def _bench_cli(*args):
    from typer.testing import CliRunner

    from erasekit.cli import app

    return CliRunner().invoke(app, ["bench", *args])


def test_bench_on_a_tiny_sd1_folder_with_a_clip_judge_and_quality(tiny_sd1, judges, tmp_path):
    """`erasekit bench` end to end: detector clip (tiny CLIP by path), quality CLIP score + FD_DINOv2 + KID on the
    preservation images of a COCO-layout prompt CSV (its rows' seeds), the original model's images as reference."""
    import json

    import yaml

    folder = tmp_path / "sd1"
    tiny_sd1.save_pretrained(folder, safe_serialization=True)
    csv = tmp_path / "coco.csv"
    csv.write_text("prompt,evaluation_seed,image_id\na cat on a sofa,11,139\na red car,12,285\na church,13,632\n",
                   encoding="utf-8")
    cfg = {
        "model": str(folder),
        "concepts": ["van gogh"],
        "methods": ["original", {"name": "uce", "settings": {}}],
        "scenarios": ["text"],
        "images_per_cell": 2,
        "sampler": {"steps": 2},
        "detector": {"name": "clip", "settings": {"model": str(judges["clip"]), "alternatives": "a photo;a car"}},
        "quality": {"clip_score": str(judges["clip"]), "fd": [{"features": "dinov2", "model": str(judges["dinov2"])}],
                    "kid": True, "kid_subsets": 2, "prompts": str(csv)},
        "preservation": {"images": 3},
        "batch_size": 4,
        "device": "cpu",
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = tmp_path / "run"
    result = _bench_cli("--preset", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tables"]["crr"]["van gogh"]) == {"original", "uce"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["detector"] == "clip" and len(r["judge_fingerprint"]) == 16 and r["judge_settings"]["alternatives"]
               == "a photo;a car" for r in rows)
    pres = [r for r in rows if r["kind"] == "preservation"]
    assert sorted({(r["prompt"], r["seed"]) for r in pres}) == [("a cat on a sofa", 11), ("a church", 13),
                                                                ("a red car", 12)]
    quality = summary["tables"]["quality"]
    assert quality["world"] == "sd" and quality["judges"]["fd_dinov2"]["model_fingerprint"]
    table = quality["table"]["van gogh"]
    assert set(table) == {"original (reference)", "original", "uce"}
    assert table["original"]["fd_dinov2"] == pytest.approx(0.0, abs=1e-6)  # the original model is the reference
    assert table["uce"]["fd_dinov2"] > 0 and table["uce"]["n_reference"] == 3 and table["uce"]["kid_dinov2"]["subsets"] == 2
    assert all(v["clip_score"]["n"] == 3 for v in table.values())
    # the toy detector's features never stand in on Stable Diffusion
    assert summary["tables"]["preservation"]["van gogh"]["uce"]["fd"] is None
    report = (out / "report.md").read_text()
    assert "## Image quality" in report and "| CLIP score | FD (dinov2) | KID (dinov2) |" in report
    assert f"(fingerprint {quality['judges']['fd_dinov2']['model_fingerprint']})" in report
    html = (out / "report.html").read_text()
    assert "<h2>Image quality</h2>" in html and "<th>FD (dinov2)</th>" in html and "van gogh" in html
    assert quality["judges"]["fd_dinov2"]["model_fingerprint"] in html


def test_bench_quality_config_errors(tmp_path, judges):
    import yaml

    def run(quality, **extra):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"model": "toy", "quality": quality, **extra}), encoding="utf-8")
        return _bench_cli("--preset", str(path), "--out", str(tmp_path / "never"))

    for quality, fragment in [
        ({"fd": [{"features": "inception"}]}, "must be one of dinov2, clip, toy"),
        ({"kid": True}, "quality.kid needs quality.fd"),
        ({"reference": str(tmp_path / "none")}, "no such folder"),
        ({"fd": [{"features": "toy", "model": "x"}]}, "no model"),
    ]:
        result = run(quality)
        assert result.exit_code == 2, result.output
        lines = [x for x in result.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    result = run({}, detector={"settings": {"model": "x"}})
    assert result.exit_code == 2 and "detector.settings needs detector.name" in result.output
    assert not (tmp_path / "never").exists()


def test_quality_against_a_reference_folder_by_image_id(judges, tmp_path):
    """reference: a folder (COCO val layout): each method's images against the CSV rows' own reference images; the
    original model's images get their own row; the toy features are refused off the embedded world."""
    import json

    from PIL import Image

    from erasekit.bench.quality import compute_quality
    from erasekit.bench.spec import parse_config
    from erasekit.metrics.features import feature_extractor
    from erasekit.metrics.frechet import frechet_distance

    ref = tmp_path / "val2014"
    ref.mkdir()
    ref_images = _images(4, size=48, seed=7)
    for i, im in enumerate(ref_images):
        Image.fromarray(im).save(ref / f"COCO_val2014_{i + 1:012d}.png")
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    rows, gen = [], {"uce": _images(4, seed=8), "original": _images(4, seed=9)}
    for method, arr in gen.items():
        kind = "reference" if method == "original" else "preservation"
        for i, im in enumerate(arr):
            path = f"images/{method}-{i}.png"
            Image.fromarray(im).save(out / path)
            rows.append({"kind": kind, "concept": "cat", "method": method, "index": i, "path": path,
                         "prompt": f"prompt {i}", "image_id": str(i + 1)})
    cfg = parse_config({"model": "toy", "quality": {"fd": [{"features": "dinov2", "model": str(judges["dinov2"])}],
                                                    "reference": str(ref)}})
    record = compute_quality(cfg, "sd", rows, out)
    table = record["table"]["cat"]
    assert set(table) == {"original (reference)", "uce"}
    ext = feature_extractor("dinov2", str(judges["dinov2"]), device="cpu")
    from erasekit.metrics.coco import reference_images

    refs, names = reference_images(ref, size=32, ids=["1", "2", "3", "4"])
    assert names[0] == "COCO_val2014_000000000001.png"
    assert table["uce"]["fd_dinov2"] == pytest.approx(round(frechet_distance(ext.extract(refs), ext.extract(gen["uce"])), 4))
    assert json.loads((out / "quality.json").read_text())["reference"] == str(ref)
    toy = parse_config({"model": "toy", "quality": {"fd": [{"features": "toy"}]}})
    with pytest.raises(ErasekitError, match="embedded world's detector"):
        compute_quality(toy, "sd", rows, out)
