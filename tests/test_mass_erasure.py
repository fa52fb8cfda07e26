"""Mass erasure (#24 item 5): several concepts in one edit from the command line (--concept repeated,
--concepts-file) and the bench (a concept entry that erases several: H_o), one-line errors for bad lists and
MACE mask folders, the world's preservation set for SPEED and MACE, and the GPU script's --mass mode in small."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def sd1_folder(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mass-cli") / "tiny-sd1"
    tiny_sd1.save_pretrained(folder)
    return folder


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def _erase(sd1_folder, out, *args):
    return runner.invoke(app, ["erase", "--model", str(sd1_folder), "--out", str(out), "--device", "cpu", "-q", *args])


# --- the command line -------------------------------------------------------------------------------------------------

def test_concepts_file_and_repeated_concept_make_one_edit(sd1_folder, tiny_sd1, tmp_path):
    from erasekit.erasers import erase, load_edit

    listing = tmp_path / "concepts.txt"
    listing.write_text("# shapes to erase\nstar\n\n  heart  \ncross\n# a repeat, erased once\nstar\n", encoding="utf-8")
    out = tmp_path / "speed"
    result = _erase(sd1_folder, out, "--method", "speed", "--concept", "circle", "--concepts-file", str(listing),
                    "--preserve", "a cat")
    assert result.exit_code == 0, result.output
    assert "warning: 1 repeated concept(s) erased once: 'star'" in result.stderr
    record = json.loads((out / "edit.json").read_text())
    assert record["concept"]["concepts"] == ["circle", "star", "heart", "cross"]
    expected = erase(tiny_sd1, "speed", ["circle", "star", "heart", "cross"], preserve=["a cat"], progress=False)
    saved = load_edit(out)
    assert saved.tensors.keys() == expected.tensors.keys()
    for name, t in expected.tensors.items():
        torch.testing.assert_close(saved.tensors[name], t)
    # one concept's edit differs: the list really is erased together
    single = erase(tiny_sd1, "speed", "circle", preserve=["a cat"], progress=False)
    assert any(not torch.equal(single.tensors[n], t) for n, t in expected.tensors.items())


@pytest.mark.parametrize("method", ["uce", "rece", "mace"])
def test_the_closed_form_methods_take_a_list(sd1_folder, tmp_path, method):
    settings = {"rece": ["--set", "epochs=1"], "mace": ["--set", "lora=false"]}.get(method, [])
    result = _erase(sd1_folder, tmp_path / method, "--method", method, "--concept", "star", "--concept", "heart",
                    "--preserve", "a cat", *settings)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / method / "edit.json").read_text())["concept"]["concepts"] == ["star", "heart"]


@pytest.mark.parametrize("make, args, fragment", [
    (lambda p: p.write_text("", encoding="utf-8"), [], "lists no concept"),
    (lambda p: p.write_text("# nothing\n\n   \n#star\n", encoding="utf-8"), [], "lists no concept"),
    (lambda p: None, [], "no such file"),
    (lambda p: p.write_bytes(b"star\n\xff\xfe\n"), [], "cannot read it as UTF-8"),
    (lambda p: p.write_text("star\nhe\x07art\n", encoding="utf-8"), [], "concepts.txt:2: concept 'he\\x07art' holds"),
    (lambda p: p.write_text("star\n<|endoftext|>\n", encoding="utf-8"), [], "'<|endoftext|>' encodes to nothing"),
    (lambda p: p.write_text("star\nheart\n", encoding="utf-8"), ["--method", "esd-x"],
     "esd-x erases one concept at a time, 2 were given"),
])
def test_bad_concept_lists_are_one_error_line(sd1_folder, tmp_path, make, args, fragment):
    listing = tmp_path / "concepts.txt"
    make(listing)
    result = _erase(sd1_folder, tmp_path / "e", *(args or ["--method", "uce"]), "--concepts-file", str(listing))
    _one_line_error(result, fragment)
    assert not (tmp_path / "e" / "edit.json").exists()


def test_no_concept_at_all_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["erase", "--method", "uce", "--out", str(tmp_path / "e")])
    _one_line_error(result, "the concept list is empty")


def test_esd_refuses_repeated_concept_before_loading(tmp_path):
    result = runner.invoke(app, ["erase", "--method", "esd-u", "--concept", "star", "--concept", "heart",
                                 "--model", "no/such/model", "--out", str(tmp_path / "e")])
    _one_line_error(result, "esd-u erases one concept at a time")  # the list is refused before the model is looked up


def _folder(path, sizes, mask=False):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        arr = np.zeros((size, size), np.uint8) if mask else (rng.random((size, size, 3)) * 255).astype(np.uint8)
        if mask:
            arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
        Image.fromarray(arr).save(path / f"img{i}.png")
    return path


@pytest.mark.parametrize("mask_sizes, fragment", [
    ([32, 32], "do not match the images"),  # a mask missing
    ([32, 16, 32], "is 16x16 pixels, its image"),  # a mask of another size
])
def test_cli_mace_mask_folder_that_does_not_match_is_one_error_line(sd1_folder, tmp_path, mask_sizes, fragment):
    images = _folder(tmp_path / "img", [32, 32, 32])
    masks = _folder(tmp_path / "mask", mask_sizes, mask=True)
    result = _erase(sd1_folder, tmp_path / "e", "--method", "mace", "--concept", "star", "--set", "steps=1",
                    "--set", f"image_folder={images}", "--set", f"mask_folder={masks}")
    _one_line_error(result, fragment)


def test_matching_mask_folder_is_accepted(tiny_sd1, tmp_path):
    from erasekit.erasers.mace_masks import folder_images_and_masks

    images = _folder(tmp_path / "img", [40, 40])
    masks = _folder(tmp_path / "mask", [40, 40], mask=True)
    arrays, got = folder_images_and_masks(str(images), str(masks), "star", (32, 32))
    assert arrays.shape == (2, 32, 32, 3) and got.shape == (2, 32, 32) and 0 < got.mean() < 1


def test_cli_mace_rank_zero_with_a_list_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["erase", "--method", "mace", "--concept", "star", "--concept", "heart",
                                 "--set", "rank=0", "--out", str(tmp_path / "e")])
    _one_line_error(result, "rank=0: a LoRA rank must be >= 1")


# --- the world's preservation set -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["speed", "mace", "uce", "rece"])
def test_the_world_preserves_the_other_labels_for_every_closed_form_method(method):
    from erasekit.bench.run import _preserve
    from erasekit.worlds import TOY_WORLD

    kept = TOY_WORLD.method_preserve(method, ["star", "heart"])
    assert kept == ["circle", "square", "triangle", "cross"]
    assert _preserve("world", TOY_WORLD, "star", method) == ["circle", "square", "triangle", "heart", "cross"]
    assert TOY_WORLD.method_preserve(method, ["plain", "striped", "dotted", "checkered"]) == []
