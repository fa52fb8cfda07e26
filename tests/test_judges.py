"""Judges for real checkpoints (clip, imagenet, q16, hf-classifier) on tiny random models saved to folders."""

import numpy as np
import pytest
import torch

from erasekit.detectors import check_spec, create_detector
from erasekit.errors import ErasekitError
from erasekit.registry import DETECTORS


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    from safetensors.torch import save_file

    from erasekit.models.tiny_judges import clip_folder, resnet_folder

    root = tmp_path_factory.mktemp("judges")
    clip = clip_folder(root / "clip")
    resnet = resnet_folder(root / "resnet")
    torch.manual_seed(1)
    save_file({"prompts": torch.randn(2, 16)}, str(root / "q16.safetensors"))
    return {"clip": clip, "resnet": resnet, "q16": root / "q16.safetensors", "root": root}


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_registered_and_listed():
    for name in ("clip", "imagenet", "q16", "hf-classifier"):
        assert name in DETECTORS.names()
    out = _cli("ls")
    assert out.exit_code == 0, out.output
    for name in ("clip", "imagenet", "q16", "hf-classifier"):
        assert f"  {name} " in out.stdout


def test_clip_is_the_models_own_zero_shot_softmax(judges):
    """Re-typed reference: with one template, P(concept) is the softmax of CLIPModel's logits_per_image over the
    concept's text and the alternatives, images preprocessed by the folder's CLIP processor."""
    from transformers import CLIPModel, CLIPProcessor

    det = create_detector(f"clip:model={judges['clip']},alternatives=a photo;a dog", concept="cat", device="cpu",
                          batch_size=3)
    images = _images(5)
    rows = det.score(images)
    model = CLIPModel.from_pretrained(str(judges["clip"]), local_files_only=True, use_safetensors=True).eval()
    proc = CLIPProcessor.from_pretrained(str(judges["clip"]), local_files_only=True)
    inputs = proc(text=["cat", "a photo", "a dog"], images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(-1)[:, 0]
    assert [r["score"] for r in rows] == pytest.approx(probs.tolist(), abs=1e-5)
    assert [r["present"] for r in rows] == [p > 0.5 for p in probs.tolist()]
    info = det.info()
    assert info["name"] == "clip" and info["classes"] == ["cat", "a photo", "a dog"]
    assert len(info["model_fingerprint"]) == 16 and info["settings"]["alternatives"] == "a photo;a dog"
    # a threshold of 0 makes every image present: the rule is P(concept) > threshold
    assert all(r["present"] for r in create_detector(f"clip:model={judges['clip']}", concept="cat",
                                                     threshold=0.0).score(images))


def test_clip_templates_ensemble_and_settings(judges):
    det = create_detector("clip", concept="church", model=str(judges["clip"]), templates="a photo of {};{}",
                          alternatives="a car")
    emb = det.class_embeddings()
    assert emb.shape[0] == 2 and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    with pytest.raises(ErasekitError, match="exactly one"):
        check_spec("clip:templates=a photo")
    with pytest.raises(ErasekitError, match="unknown setting 'colour' for detector clip"):
        check_spec("clip:colour=red")
    with pytest.raises(ErasekitError, match="takes no settings"):
        check_spec("toy:model=x")


def test_imagenet_top1_and_hf_classifier_threshold(judges):
    """Re-typed reference: the classifier's logits on images at the processor's resize size (36 = 32 / 0.875, then a
    centre crop to 32), top-1 = the class's index."""
    from transformers import ResNetForImageClassification

    images = _images(6, size=36, seed=2)
    det = create_detector(f"imagenet:model={judges['resnet']}", concept="church")
    assert det.index == 1 and det.label == "church, church building"
    rows = det.score(images)
    model = ResNetForImageClassification.from_pretrained(str(judges["resnet"]), local_files_only=True).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()[:, :, 2:34, 2:34] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(pixel_values=x).logits.softmax(-1)
    assert [r["score"] for r in rows] == pytest.approx(probs[:, 1].tolist(), abs=1e-5)
    assert [r["present"] for r in rows] == (probs.argmax(-1) == 1).tolist()
    top2 = create_detector(f"imagenet:model={judges['resnet']},top_k=2", concept="church").score(images)
    assert [r["present"] for r in top2] == [int((p > p[1]).sum()) < 2 for p in probs]
    hf = create_detector(f"hf-classifier:model={judges['resnet']},label=3,threshold=0.2")
    assert hf.label == "parachute, chute"
    assert [r["present"] for r in hf.score(images)] == (probs[:, 3] > 0.2).tolist()
    assert hf.info()["rule"] == "P(class 3 = parachute, chute) > 0.2"


def test_q16_is_softmax_of_100_cosines(judges):
    """Re-typed Q16: softmax(100 * norm(image_embeds) @ norm(prompts).T)[1]."""
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPProcessor

    det = create_detector(f"q16:model={judges['clip']},prompts={judges['q16']}")
    images = _images(4, seed=3)
    rows = det.score(images)
    model = CLIPModel.from_pretrained(str(judges["clip"]), local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(str(judges["clip"]), local_files_only=True)
    with torch.no_grad():
        e = model.get_image_features(**proc(images=list(images), return_tensors="pt")).pooler_output
    p = load_file(str(judges["q16"]))["prompts"]
    sim = 100 * (e / e.norm(dim=-1, keepdim=True)) @ (p / p.norm(dim=-1, keepdim=True)).T
    assert [r["score"] for r in rows] == pytest.approx(sim.softmax(-1)[:, 1].tolist(), abs=1e-5)
    assert det.info()["prompts_fingerprint"]


def test_pickle_only_missing_and_unknown_label_are_one_line_errors(judges, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((judges["resnet"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    with pytest.raises(ErasekitError, match="pickled weights only .pytorch_model.bin."):
        create_detector(f"hf-classifier:model={pickled},label=0")
    with pytest.raises(ErasekitError, match="no such folder"):
        create_detector(f"imagenet:model={tmp_path / 'nothing'}", concept="church")
    with pytest.raises(ErasekitError, match="has no class 'zebra'"):
        create_detector(f"imagenet:model={judges['resnet']}", concept="zebra")
    with pytest.raises(ErasekitError, match="out of range"):
        create_detector(f"hf-classifier:model={judges['resnet']},label=99")
    with pytest.raises(ErasekitError, match="no model given.*ERASEKIT_CLIP"):
        create_detector("clip", concept="cat")
    bad = tmp_path / "q16.safetensors"
    from safetensors.torch import save_file

    save_file({"prompts": torch.zeros(2, 5)}, str(bad))
    with pytest.raises(ErasekitError, match="5-d but the CLIP model's image embeddings are 16-d"):
        create_detector(f"q16:model={judges['clip']},prompts={bad}")


def _cli(*args):
    from typer.testing import CliRunner

    from erasekit.cli import app

    return CliRunner().invoke(app, list(args))


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output


def test_cli_detect_with_a_judge_and_its_errors(judges, tmp_path):
    import json

    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray(_images(1)[0]).save(path)
    ok = _cli("detect", str(path), "--detector", f"hf-classifier:model={judges['resnet']},label=golf ball")
    assert ok.exit_code == 0, ok.output
    row = json.loads(ok.stdout.strip().splitlines()[-1])
    assert row["detector"] == "hf-classifier" and row["preset"] == "2=golf ball" and 0 <= row["score"] <= 1
    _one_line_error(_cli("detect", str(path), "--detector", f"clip:model={tmp_path / 'gone'}", "--concept", "cat"),
                    "no such folder")
    _one_line_error(_cli("detect", str(path), "--detector", f"imagenet:model={judges['resnet']}", "--concept", "zebra"),
                    "has no class 'zebra'")
    # a concept with no default judge on a Stable Diffusion model: says which detector settings to give
    from erasekit.worlds import SD_WORLD

    with pytest.raises(ErasekitError, match="no default detector for concept 'van gogh'.*clip:model="):
        SD_WORLD.default_detector("van gogh", env={})


def test_sd_world_default_judges_from_configured_models(judges):
    from erasekit.worlds import SD_WORLD

    env = {"ERASEKIT_CLIP": str(judges["clip"]), "ERASEKIT_IMAGENET": str(judges["resnet"])}
    assert SD_WORLD.default_detector("nudity", env=env) == "nudenet:unlearndiffatk"
    assert SD_WORLD.default_detector("church", env=env) == "imagenet"  # a class of the configured classifier
    assert SD_WORLD.default_detector("Van Gogh", env=env) == "clip"
    assert SD_WORLD.default_detector("church", env={"ERASEKIT_CLIP": str(judges["clip"])}) == "clip"
    with pytest.raises(ErasekitError, match="imagenet:model=FOLDER"):
        SD_WORLD.default_detector("church", env={})


def test_attack_scores_with_a_judge_and_records_it(tiny_sd1, judges, tmp_path):
    """`erasekit attack --detector clip:model=FOLDER,...` on a tiny SD-1 folder: every score row names the judge's
    model, fingerprint and settings."""
    import json

    from typer.testing import CliRunner

    from erasekit.cli import app

    folder = tmp_path / "sd1"
    tiny_sd1.save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "attack"
    result = CliRunner().invoke(app, ["attack", "--scenario", "text", "--concept", "van gogh", "--model", str(folder),
                                      "--out", str(out), "-n", "3", "--steps", "2", "--device", "cpu", "--detector",
                                      f"clip:model={judges['clip']},alternatives=a photo;a car"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["detector"] == "clip" and r["preset"] == "van gogh" for r in rows)
    assert all(len(r["judge_fingerprint"]) == 16 and r["judge_settings"]["alternatives"] == "a photo;a car"
               for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detector"]["model_fingerprint"] == rows[0]["judge_fingerprint"]


def test_a_hub_id_is_read_from_the_hub_cache_only(judges, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-resnet"
    shutil.copytree(judges["resnet"], repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    det = create_detector("hf-classifier:model=someone/tiny-resnet,label=church")
    assert det.folder == repo / "snapshots" / sha and det.index == 1
    with pytest.raises(ErasekitError, match="neither a folder nor in the hub cache.*hf download someone/absent"):
        create_detector("hf-classifier:model=someone/absent,label=church")


def test_preprocessing_reads_the_real_checkpoints_processor_configs(tmp_path):
    """The preprocessor_config.json layouts of openai/clip-vit-large-patch14 (bare int size: the shortest edge) and
    microsoft/resnet-50 (int size with crop_pct): resize the shortest edge, then a centre crop."""
    import json

    from erasekit.detectors.hf_models import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 224, "do_center_crop": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
         "size": 224, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    p = Preprocess(tmp_path, 224)
    assert (p.shortest, p.crop) == (224, (224, 224))
    assert p(np.zeros((2, 300, 400, 3), np.uint8), "cpu", torch.float32).shape == (2, 3, 224, 224)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_pct": 0.875, "do_resize": True, "feature_extractor_type": "ConvNextFeatureExtractor", "size": 224}))
    p = Preprocess(tmp_path, 224, IMAGENET_MEAN, IMAGENET_STD)  # the classifier judges' defaults
    assert (p.shortest, p.crop) == (256, (224, 224))
    x = p(np.full((1, 512, 512, 3), 255, np.uint8), "cpu", torch.float32)
    assert x.shape == (1, 3, 224, 224) and torch.allclose(x[0, 0], torch.full((224, 224), (1 - 0.485) / 0.229), atol=1e-4)
