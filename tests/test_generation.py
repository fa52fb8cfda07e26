"""Seeded, batched generation and the resumable image folder."""

import json

import numpy as np
import pytest
import torch

from erasekit.diffusion import Target
from erasekit.generation import GenerationInputs, default_settings, generate, generate_to_dir, initial_latents
from erasekit.image_store import INDEX_FILE, read_index, save_images, write_grid
from erasekit.toy.architecture import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SIZE, LATENT_SIZE

STEPS = 4


def test_initial_latents_are_per_seed(toy_random, tiny_sd1):
    lat = initial_latents(toy_random, [3, 4, 3])
    assert lat.shape == (3, 4, LATENT_SIZE, LATENT_SIZE) and lat.dtype == torch.float32
    torch.testing.assert_close(lat[0], lat[2], rtol=0, atol=0)
    torch.testing.assert_close(lat[1], initial_latents(toy_random, [4])[0], rtol=0, atol=0)
    assert initial_latents(tiny_sd1, [0]).shape == (1, 4, 16, 16)
    assert initial_latents(tiny_sd1, [0], height=64, width=48).shape == (1, 4, 32, 24)


def test_default_settings(toy_random, tiny_sd1):
    assert default_settings(toy_random) == (DEFAULT_STEPS, DEFAULT_GUIDANCE)
    assert default_settings(tiny_sd1) == (25, 7.5)


def test_same_seed_same_image_for_any_batch_size(toy_random):
    prompts = ["a red star on a striped background", "a blue heart", "a starfish", "a green circle", "a cross"]
    seeds = [0, 1, 2, 3, 0]
    kwargs = dict(steps=STEPS, guidance=5.0, progress=False)
    together = generate(toy_random, prompts, seeds, batch_size=5, **kwargs)
    in_pairs = generate(toy_random, prompts, seeds, batch_size=2, **kwargs)
    alone = generate(toy_random, prompts[1:2], seeds[1:2], batch_size=1, **kwargs)
    assert together.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and together.dtype == np.uint8
    # Batched CPU kernels may differ in the last float bit between batch sizes: allow 1 uint8 level.
    for other in (in_pairs, np.concatenate([in_pairs[:1], alone, in_pairs[2:]])):
        assert np.abs(together.astype(int) - other.astype(int)).max() <= 1
    assert np.abs(together[0].astype(int) - together[1].astype(int)).max() > 1  # different seeds differ


def test_generate_with_prompt_embeds_and_latents(tiny_sd1):
    from erasekit.models import encode_prompts

    prompts, seeds = ["a red star", "a dog"], [5, 6]
    kwargs = dict(steps=STEPS, guidance=7.5, progress=False)
    by_text = generate(tiny_sd1, prompts, seeds, **kwargs)
    by_embeds = generate(tiny_sd1, None, seeds, prompt_embeds=encode_prompts(tiny_sd1, prompts), **kwargs)
    by_latents = generate(tiny_sd1, prompts, [0, 0], latents=initial_latents(tiny_sd1, seeds), **kwargs)
    np.testing.assert_array_equal(by_text, by_embeds)
    np.testing.assert_array_equal(by_text, by_latents)


def test_generate_rejects_mismatched_lengths(tiny_sd1):
    with pytest.raises(ValueError, match="prompts: expected 2"):
        generate(tiny_sd1, ["a", "b", "c"], [0, 1], steps=1, progress=False)
    with pytest.raises(ValueError, match="prompt_embeds"):
        generate(tiny_sd1, None, [0], progress=False)


def test_generate_to_dir_is_resumable(tiny_sd1, tmp_path):
    prompts, seeds = ["a red star", "a red star", "a dog"], [0, 1, 0]
    kwargs = dict(steps=STEPS, guidance=7.5, progress=False)
    target = Target(tiny_sd1, model="tiny")
    records, made = generate_to_dir(target, GenerationInputs(prompts, seeds), tmp_path, batch_size=2, **kwargs)
    assert made == 3 and len(records) == 3 and (tmp_path / "grid.png").is_file()
    first = (tmp_path / records[0]["path"]).read_bytes()
    # Rerun with one more seed: only the new image is generated, the others are reused byte for byte.
    records2, made2 = generate_to_dir(target, GenerationInputs(prompts + ["a dog"], seeds + [1]), tmp_path, **kwargs)
    assert made2 == 1 and records2[:3] == records
    assert (tmp_path / records[0]["path"]).read_bytes() == first
    # Other settings are other images.
    _, made3 = generate_to_dir(target, GenerationInputs(prompts[:1], seeds[:1]), tmp_path, **dict(kwargs, guidance=3.0))
    assert made3 == 1
    lines = [json.loads(line) for line in (tmp_path / INDEX_FILE).read_text().splitlines()]
    assert len(lines) == 5 and len(read_index(tmp_path)) == 5
    # A PNG deleted by hand is regenerated.
    (tmp_path / records[2]["path"]).unlink()
    _, made4 = generate_to_dir(target, GenerationInputs(prompts, seeds), tmp_path, **kwargs)
    assert made4 == 1


def test_read_index_ignores_partial_last_line(tmp_path):
    img = np.zeros((1, 8, 8, 3), np.uint8)
    [rec] = save_images(img, tmp_path, [{"prompt": "p", "seed": 0}])
    with open(tmp_path / INDEX_FILE, "a") as f:
        f.write('{"prompt": "q", "se')  # a run killed mid-write
    assert list(read_index(tmp_path)) == [rec["key"]]


def test_grid_upscales_small_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    records = save_images(images, tmp_path, [{"prompt": f"p{i // 3}", "seed": i % 3} for i in range(6)])
    from PIL import Image

    grid = Image.open(write_grid(tmp_path, records))
    assert grid.width >= 3 * 128 and grid.height >= 2 * 128
    assert all((tmp_path / r["path"]).is_file() for r in records)


def test_image_key_covers_attack_inputs_and_names_are_readable():
    from erasekit.image_store import image_filename, record_key

    rec = {"prompt": "", "seed": 3, "steps": 20}
    assert record_key(rec) != record_key(dict(rec, inputs="latents:abc")) != record_key(dict(rec, inputs="latents:abd"))
    assert image_filename(rec).startswith("empty_seed3_")
    assert image_filename(dict(rec, prompt=None)).startswith("embeds_seed3_")
    assert image_filename(dict(rec, prompt="A red star!")).startswith("a-red-star_seed3_")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_images_are_rounded_on_the_device_exactly_as_diffusers_rounds_them(dtype):
    """decode_latents converts to uint8 before the host copy: the same values as diffusers' numpy rounding,
    halves included (round half to even)."""
    from erasekit.diffusion.sampler import to_uint8
    from erasekit.diffusion.vae import _to_uint8

    gen = torch.Generator().manual_seed(0)
    halves = (torch.arange(0, 511) / 255.0 - 1.0).view(1, 1, 1, -1)  # every level's midpoint in [-1, 1]
    x = torch.cat([halves.expand(1, 3, 4, -1), (torch.rand(1, 3, 4, 511, generator=gen) * 2.4 - 1.2)]).to(dtype)
    want = to_uint8((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy())
    assert np.array_equal(_to_uint8(x), want)


# -- one run path (#19): the bench's jobs, `erasekit generate` and `erasekit attack` share key, store and resume ----
def test_processes_split_a_store_and_resume_as_one(tiny_sd1, tmp_path):
    """Two shares (the bench's processes) generate disjoint items into one store, each appending to its own index;
    together they are exactly what one process makes, and a rerun of the whole generates nothing."""
    from PIL import Image

    target = Target(tiny_sd1, model="tiny")
    inputs = GenerationInputs(["a star"] * 3 + ["a dog"] * 2, [0, 1, 2, 0, 1])
    kw = dict(steps=2, batch_size=1, progress=False, keyed_names=True, grid=False)
    mine, made0 = generate_to_dir(target, inputs, tmp_path / "s", share=(0, 2), **kw)
    theirs, made1 = generate_to_dir(target, inputs, tmp_path / "s", share=(1, 2), **kw)
    assert (made0, made1) == (3, 2) and [r["seed"] for r in mine] == [0, 2, 1] and len(theirs) == 2
    assert (tmp_path / "s" / INDEX_FILE).is_file() and (tmp_path / "s" / "images.p1.jsonl").is_file()
    whole, made = generate_to_dir(target, inputs, tmp_path / "s", **kw)
    alone, _ = generate_to_dir(target, inputs, tmp_path / "one", **kw)
    assert made == 0 and len(read_index(tmp_path / "s")) == 5
    assert [r["key"] for r in whole] == [r["key"] for r in alone]
    for r in whole:
        assert r["path"] == f"{r['key'][:2]}/{r['key']}.png"
        a, b = (np.asarray(Image.open(d / r["path"])) for d in (tmp_path / "s", tmp_path / "one"))
        assert np.array_equal(a, b)


def test_a_bench_job_and_the_store_name_an_image_alike(tiny_sd1):
    """The bench's `Job.key` is the store's key of the record `generate_to_dir` writes for that image; other
    settings (fast mode, another seed or guidance) are other images."""
    from erasekit.bench.cells import Cell
    from erasekit.bench.plan import Job, sampling_fields
    from erasekit.generation import image_records, target_fields
    from erasekit.image_store import record_key

    target = Target(tiny_sd1, model="tiny")
    inputs = GenerationInputs(["a star", "a dog"], [3, 4], guidance=[None, 2.0])
    records = image_records(target, inputs, steps=5, guidance=7.5)
    fields = target_fields(target)
    cell = Cell("star", "original", "text")
    jobs = [Job(cell, 0, "a star", 3, 5, 7.5, None, None, fields["target"], sampling=sampling_fields(fields)),
            Job(cell, 1, "a dog", 4, 5, 2.0, None, None, fields["target"], sampling=sampling_fields(fields))]
    assert [j.key for j in jobs] == [record_key(r) for r in records]
    fast = image_records(target, inputs, steps=5, guidance=7.5, fast=True)
    assert fast[0]["fast"] is True and record_key(fast[0]) != jobs[0].key
    assert record_key(dict(records[0], seed=5)) != jobs[0].key != record_key(dict(records[0], guidance=7.0))
