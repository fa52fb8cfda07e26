"""IRECE on SD3 and FLUX.1: its mask from the joint attention's text-to-image part (`capture_joint_attention`),
checked against the attention the transformer itself computes, and the defence on tiny erased flow pipelines."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.defences import parse_defence
from erasekit.diffusion import Target
from erasekit.diffusion.family import family_of
from erasekit.generation import generate


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()


@pytest.fixture(scope="module")
def uce_edit(flow_pipe):
    from erasekit.erasers import erase

    return erase(flow_pipe, "uce", "star", progress=False)


def _gen(target, prompts="a red star", steps=3):
    return generate(target, prompts, [0, 1], steps=steps, guidance=4.0, progress=False)


def test_captured_maps_are_the_transformers_own_attention(flow_pipe, monkeypatch):
    """Each record equals softmax(q k^T / sqrt(d)) of the q and k the transformer hands to its attention kernel
    (norms, FLUX's rotary embeddings and the [text; image] / [image; text] order included): its image rows,
    text columns, mean over heads. The transformer's output is unchanged by the capture."""
    from erasekit.diffusion.attention import capture_joint_attention
    from erasekit.diffusion.guidance import UNetDenoiser
    from erasekit.diffusion.sites import image_text_attention

    family = family_of(flow_pipe)
    model = family.denoiser(flow_pipe)
    cond = family.encode(flow_pipe, ["a red star", "a dog"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):  # SD3's processor passes q, k, v by position, diffusers' dispatcher by name
        q, k = (args[i] if len(args) > i else kwargs[n] for i, n in ((0, "query"), (1, "key")))
        seen.append((q.detach(), k.detach()))
        return real(*args, **kwargs)

    with torch.no_grad():
        plain = UNetDenoiser(model, family)(x, t, cond)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        with capture_joint_attention(model, None) as cap:
            out = UNetDenoiser(model, family)(x, t, cond)
    sites = image_text_attention(model)
    flux = family.name == "flux"
    assert [s.layout for s in sites] == (["text_first", "single"] if flux else ["image_first"] * 2)
    assert torch.equal(out, plain)
    assert [name for name, _ in cap.records] == [s.name for s in sites] and len(seen) == len(sites)
    t_len = cond.states.shape[1]
    for (name, probs), (q, k) in zip(cap.records, seen):
        full = (q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # (B, H, L, L)
        n_img = q.shape[2] - t_len
        if flux:  # [text; image]
            ref = full[:, :, t_len:, :t_len]
        else:  # [image; text]
            ref = full[:, :, :n_img, n_img:]
        assert probs.shape == (2, t_len, n_img)
        torch.testing.assert_close(probs, ref.mean(1).transpose(1, 2), atol=1e-5, rtol=1e-4)
    assert cap.aggregate((16, 16)).shape == (2, 16, 16)


def test_concept_positions_in_the_transformers_text_sequence(flow_pipe):
    """SD3: the CLIP word positions, then the T5 ones after CLIP's 77; FLUX.1: the T5 word positions."""
    from erasekit.defences.irece import concept_text_positions

    family = family_of(flow_pipe)
    one, two = (concept_text_positions(flow_pipe, family, c) for c in ("star", "red star"))
    if family.name == "sd3":
        assert one == [1, 77] and two == [1, 2, 77, 78]
    else:
        assert one == [0] and two == [0, 1]


def test_irece_zero_strength_is_exact_and_on_changes_images_and_restores_weights(flow_pipe, uce_edit):
    from erasekit.models import fingerprint

    base = fingerprint(flow_pipe)
    erased = Target(flow_pipe).with_edits(uce_edit)
    edited = _gen(erased)
    assert np.array_equal(_gen(erased.with_defences(parse_defence("irece:concept=star,strength=0,stop=1"))), edited)
    for spec in ["irece:concept=star,stop=1", "irece:concept=star,stop=1,mask=top_k,top_k=0.5,kind=both"]:
        defended = _gen(erased.with_defences(parse_defence(spec)))
        assert defended.shape == edited.shape and not np.array_equal(defended, edited), spec
        assert fingerprint(flow_pipe) == base, spec
    # given text states (no prompts) and the empty prompt
    target = erased.with_defences(parse_defence("irece:concept=star,stop=1"))
    states = erased.family.encode(flow_pipe, ["a star"] * 2)
    given = generate(target, None, [0, 1], steps=3, guidance=4.0, prompt_embeds=states, progress=False)
    assert given.shape == edited.shape
    assert _gen(target, prompts="").shape == edited.shape


def test_irece_localises_with_the_original_weights(flow_pipe, uce_edit, monkeypatch):
    import erasekit.diffusion.attention as attention
    from erasekit.models import fingerprint

    base = fingerprint(flow_pipe)
    seen = []
    real = attention.capture_joint_attention

    def spy(model, *a, **k):
        seen.append(fingerprint(flow_pipe))
        return real(model, *a, **k)

    monkeypatch.setattr(attention, "capture_joint_attention", spy)
    _gen(Target(flow_pipe).with_edits(uce_edit).with_defences(parse_defence("irece:concept=star,stop=1")))
    assert len(seen) == 3 and all(fp == base for fp in seen)
    assert fingerprint(flow_pipe) == base


def test_irece_changes_the_step_only_where_the_concept_attends(flow_pipe, uce_edit):
    """One step in the window: the next latents are the sampler's own outside the mask and re-drawn inside it
    ("noise": the step's noise level kept, its pattern replaced)."""
    from erasekit.defences.irece import IRECE
    from erasekit.diffusion.sampler import Sampler
    from erasekit.generation import build_guidance

    erased = Target(flow_pipe).with_edits(uce_edit)
    target = erased.with_defences(IRECE.from_overrides({"concept": "star", "stop": 0.25, "mask": "top_k",
                                                        "top_k": 0.3}))
    sampler = Sampler(flow_pipe, 4)
    z = sampler.prepare_latents(sampler.draw_noise([torch.Generator().manual_seed(s) for s in (0, 1)], 32, 32))
    with torch.no_grad(), target.active():
        guidance, hooks = build_guidance(target, sampler, ["a red star"] * 2, None, None, 4.0, [0, 1])
        (hook,) = hooks
        defended = sampler.denoise(z, guidance, hooks, stop=1)
        plain = sampler.denoise(z, guidance, [], stop=1)
    mask = hook.last_mask.expand_as(plain) > 0
    assert 0.25 < float(hook.last_mask.mean()) < 0.35
    assert torch.equal(defended[~mask], plain[~mask])
    assert (defended[mask] - plain[mask]).abs().min() > 0
    # the noise level is kept: inside the mask the re-drawn latents have about the plain ones' spread
    assert 0.5 < float(defended[mask].std() / plain[mask].std()) < 2.0


def test_irece_masks_follow_the_concepts_attention(flow_pipe):
    """The mask is where the concept's tokens are attended: other concepts' text gives other masks."""
    from erasekit.defences.irece import IRECE
    from erasekit.diffusion.sampler import Sampler
    from erasekit.generation import build_guidance

    masks = {}
    for concept in ("star", "dog"):
        target = Target(flow_pipe).with_defences(IRECE.from_overrides({"concept": concept, "stop": 0.5,
                                                                       "mask": "top_k", "top_k": 0.25}))
        sampler = Sampler(flow_pipe, 2)
        z = sampler.prepare_latents(sampler.draw_noise([torch.Generator().manual_seed(0)], 32, 32))
        with torch.no_grad(), target.active():
            guidance, (hook,) = build_guidance(target, sampler, ["a red star"], None, None, 4.0, [0])
            sampler.denoise(z, guidance, [hook], stop=1)
        masks[concept] = hook.last_mask
    assert not torch.equal(masks["star"], masks["dog"])


def test_cli_erase_then_generate_with_irece_on_a_flow_folder(tmp_path):
    """End to end on a tiny SD3 folder: erase (UCE), then generate with the edit and IRECE."""
    from erasekit.cli import app
    from erasekit.models.tiny_flow import save_tiny_flow_pipeline

    folder = save_tiny_flow_pipeline("sd3", tmp_path / "sd3")
    runner = CliRunner()
    edit = tmp_path / "uce-star"
    result = runner.invoke(app, ["erase", "--method", "uce", "--concept", "star", "--model", str(folder), "--out",
                                 str(edit), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    outs = {}
    for name, extra in (("edit", []), ("irece", ["--defence", "irece:concept=star,stop=1"])):
        out = tmp_path / name
        result = runner.invoke(app, ["generate", "a red star", "--model", str(folder), "-n", "2", "--steps", "3",
                                     "--out", str(out), "--edit", str(edit), "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
        outs[name] = (records, np.stack([np.asarray(Image.open(out / r["path"])) for r in records]))
    (records, defended), (plain_records, plain) = outs["irece"], outs["edit"]
    assert len(records) == 2 and records[0]["defences"][0]["name"] == "irece"
    assert {r["key"] for r in records}.isdisjoint(r["key"] for r in plain_records)
    assert defended.shape == plain.shape and not np.array_equal(defended, plain)
