"""Text scenario prompts (embedded world, generic) and I2P-layout CSV prompts."""

import json

import pytest

from erasekit.attacks.i2p import i2p_inputs, load_i2p_csv
from erasekit.attacks.text import text_inputs
from erasekit.errors import ErasekitError
from erasekit.toy import world
from erasekit.worlds import SD_WORLD, TOY_WORLD

toy_concept_prompts = TOY_WORLD.concept_prompts
generic_concept_prompts = SD_WORLD.concept_prompts


def test_toy_prompts_name_the_concept_in_every_way():
    prompts = toy_concept_prompts("star")
    assert len(prompts) == len(set(prompts)) >= 10
    for p in world.EVAL_PARAPHRASES["star"]:
        assert p in prompts
    other_shapes = [w for s in world.SHAPES if s != "star" for w in world.SHAPE_WORDS[s]]
    for p in prompts:
        if p in world.EVAL_PARAPHRASES["star"]:
            continue
        assert "star" in p
        assert not any(f" {w} " in f" {p} " for w in other_shapes), p
    assert toy_concept_prompts("star") == prompts  # deterministic


@pytest.mark.parametrize("concept, kind", [("red", "color"), ("striped", "texture")])
def test_toy_prompts_for_colours_and_textures(concept, kind):
    words = {"color": world.COLOR_WORDS, "texture": world.TEXTURE_WORDS}[kind][concept]
    prompts = toy_concept_prompts(concept)
    assert prompts and all(any(w in p for w in words) for p in prompts)


def test_unknown_toy_concept():
    with pytest.raises(ErasekitError, match="unknown concept 'dragon'"):
        toy_concept_prompts("dragon")


def test_text_inputs_cycle_prompts_with_one_seed_per_image():
    inputs = text_inputs(generic_concept_prompts("church"), 7, seed=100)
    assert inputs.prompts[:5] == generic_concept_prompts("church") and inputs.prompts[5] == inputs.prompts[0]
    assert inputs.seeds == list(range(100, 107)) and inputs.guidance is None and inputs.latents is None
    assert inputs.budget["images_used"] == 0
    with pytest.raises(ErasekitError, match="-n must be at least 1"):
        text_inputs(toy_concept_prompts("star"), 0)


I2P_CSV = (
    "prompt,categories,hard,inappropriate_percentage,nudity_percentage,evaluation_seed,evaluation_guidance,case_number\n"
    '"a nude person, oil painting",sexual,1,90.0,80.0,2734971755,7,12\n'
    "a church at night,,0,0,0,42,9.5,13\n"
    "plain prompt,violence,0,10,0,,,14\n"
)


def test_i2p_csv_keeps_seeds_guidance_and_case_numbers(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text(I2P_CSV)
    rows = load_i2p_csv(path)
    assert [r.prompt for r in rows] == ["a nude person, oil painting", "a church at night", "plain prompt"]
    assert [r.seed for r in rows] == [2734971755, 42, 2]  # empty seed -> row index
    assert [r.guidance for r in rows] == [7.0, 9.5, None]
    assert [r.case_number for r in rows] == ["12", "13", "14"] and rows[1].categories is None

    inputs = i2p_inputs(rows)
    assert inputs.seeds == [2734971755, 42, 2] and inputs.guidance == [7.0, 9.5, None]
    assert inputs.items[0] == {"case_number": "12", "categories": "sexual"}
    more = i2p_inputs(rows, n=5)
    assert more.seeds == [2734971755, 42, 2, 2734971756, 43] and more.prompts[3] == rows[0].prompt


def test_i2p_minimal_layout(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\na star\na heart\n")
    rows = load_i2p_csv(path)
    assert [(r.prompt, r.seed, r.guidance) for r in rows] == [("a star", 0, None), ("a heart", 1, None)]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("text,evaluation_seed\na star,1\n", "has no 'prompt' column"),
        ("prompt,evaluation_seed\n", "no prompts"),
        ("prompt,evaluation_seed\na star,abc\n", "line 2: evaluation_seed 'abc' is not a number"),
        ("prompt,evaluation_guidance\na star,high\n", "evaluation_guidance 'high'"),
        ("", "has no 'prompt' column"),
    ],
)
def test_bad_csv(tmp_path, text, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ErasekitError, match=fragment):
        load_i2p_csv(path)


def test_missing_or_binary_csv(tmp_path):
    with pytest.raises(ErasekitError, match="no such file"):
        load_i2p_csv(tmp_path / "none.csv")
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00\x81prompt")
    with pytest.raises(ErasekitError):
        load_i2p_csv(path)


def test_per_row_guidance_reaches_generation(tiny_sd1, tmp_path):
    from erasekit.generation import generate_to_dir

    path = tmp_path / "p.csv"
    path.write_text("prompt,evaluation_seed,evaluation_guidance\na red star,5,3\na dog,6,\na cat,7,3\n")
    inputs = i2p_inputs(load_i2p_csv(path))
    records, generated = generate_to_dir(tiny_sd1, inputs, tmp_path / "out", steps=2, record={"attack": inputs.attack},
                                         progress=False)
    assert generated == 3
    assert [(r["prompt"], r["seed"], r["guidance"]) for r in records] == [
        ("a red star", 5, 3.0), ("a dog", 6, 7.5), ("a cat", 7, 3.0)]
    index = [json.loads(x) for x in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert len(index) == 3 and all(r["attack"] == "i2p" for r in index)
    again = generate_to_dir(tiny_sd1, inputs, tmp_path / "out", steps=2, record={"attack": inputs.attack}, progress=False)
    assert again[1] == 0  # resumed
