"""AdvUnlearn (#24): adversarial training of the text encoder. The outer loss against a re-typed reference
computation, the inner attack, which parameters train, zero strength = identity, bad input, tiny SD-1 / SD-2 /
SDXL pipelines, and the trained embedded world (a short run, a small detector-scored sample)."""

import pytest
import torch

from erasekit.erasers import erase
from erasekit.erasers.advunlearn import (AdvUnlearnSettings, PrefixAttack, attack_loss, encode, encoder_parameters,
                                         outer_loss, retain_texts)
from erasekit.errors import ErasekitError

TINY = {"iterations": 3, "warmup": 1, "attack_steps": 2, "trajectories": 2, "ddim_steps": 3, "lr": 1e-3,
        "retain_batch": 2}


def _text_state(pipe, prompt="a photo of a star"):
    with torch.no_grad():
        return encode(pipe, [prompt]).states.clone()


@pytest.mark.parametrize("variant", ["tiny_sd1", "tiny_sd2", "tiny_sdxl"])
def test_advunlearn_edits_only_the_text_encoders(request, variant):
    from erasekit.models import fingerprint

    pipe = request.getfixturevalue(variant)
    before, states = fingerprint(pipe), _text_state(pipe)
    edit = erase(pipe, "advunlearn", "star", settings=TINY, progress=False)
    assert fingerprint(pipe) == before and torch.equal(_text_state(pipe), states)  # the pipeline left as it was
    components = {n.split(".")[0] for n in edit.tensors}
    assert components == ({"text_encoder", "text_encoder_2"} if variant == "tiny_sdxl" else {"text_encoder"})
    params = {f"{c}.{n}": p for c in components for n, p in getattr(pipe, c).named_parameters()}
    assert any(not torch.equal(t, params[n]) for n, t in edit.tensors.items())
    assert not any("embeddings" in n or "text_projection" in n for n in edit.tensors)
    assert edit.extra["attack"]["rounds"] == 2  # warm-up step 0, attacks before steps 1 and 2
    edit.apply(pipe)
    try:
        assert not torch.equal(_text_state(pipe), states)  # the encoder's output moved
    finally:
        edit.revert(pipe)
    assert torch.equal(_text_state(pipe), states)
    if variant == "tiny_sdxl":
        first = erase(pipe, "advunlearn", "star", settings={**TINY, "encoders": "first"}, progress=False)
        assert {n.split(".")[0] for n in first.tensors} == {"text_encoder"}


def test_advunlearn_simplex_attack_types_whole_word_prefixes(tiny_sd1):
    edit = erase(tiny_sd1, "advunlearn", "star", settings={**TINY, "attack_space": "simplex", "attack_tokens": 2},
                 progress=False)
    prompts = edit.extra["attack"]["example_prompts"]
    assert prompts and all(p.endswith(" star") and len(p.split()) == 3 for p in prompts)


@pytest.mark.parametrize("variant", ["tiny_sd1", "toy_random"])
def test_advunlearn_zero_lr_is_the_identity(request, variant):
    import numpy as np

    from erasekit.diffusion import Target
    from erasekit.generation import generate

    pipe = request.getfixturevalue(variant)
    edit = erase(pipe, "advunlearn", "star", settings={**TINY, "lr": 0}, progress=False)
    prompts = ["a photo of a star", "a cat"]
    plain = generate(Target(pipe), prompts, seeds=[0, 1], steps=3, progress=False)
    edited = generate(Target(pipe).with_edits(edit), prompts, seeds=[0, 1], steps=3, progress=False)
    assert edit.tensors and np.array_equal(np.asarray(plain), np.asarray(edited))


def test_outer_loss_is_the_reference_step(tiny_sd1):
    """get_train_loss_retain with retain_train='reg', re-typed: e_n from the text encoder fed [sot, adv, prompt, eot]
    (prefix_k; adv here the embedding of one whole-word token v, so the reference's sequence is the tokens of
    "v prompt": SD-1's tokenizer pads with EOS), loss = MSE(e_n, e0 - ng (ep - e0)) + w MSE(retain e_n, retain ep);
    the same value and the same gradients on the text encoder; the attack's loss is MSE(e_n, ep)."""
    from erasekit.attacks.unlearndiffatk import candidate_vocabulary

    pipe, tok, enc, unet = tiny_sd1, tiny_sd1.tokenizer, tiny_sd1.text_encoder, tiny_sd1.unet
    g = torch.Generator().manual_seed(0)
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    z, rz = torch.randn(shape, generator=g), torch.randn((2, *shape[1:]), generator=g)
    t = torch.tensor([437])
    word, retain = "star", ["a cat", "a dog on a sofa"]
    v = int(candidate_vocabulary(tok)[7])
    ids = lambda texts: tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,  # noqa: E731
                            return_tensors="pt").input_ids
    with torch.no_grad():  # the frozen model's predictions
        emb_0, emb_p, retain_emb_p = enc(ids([""]))[0], enc(ids([word]))[0], enc(ids(retain))[0]
        e_0 = unet(z, t, encoder_hidden_states=emb_0).sample
        e_p = unet(z, t, encoder_hidden_states=emb_p).sample
        retain_e_p = unet(rz, t.expand(2), encoder_hidden_states=retain_emb_p).sample
    ng, w = 1.0, 0.3
    params = [p for n, p in enc.named_parameters() if n in encoder_parameters(enc, AdvUnlearnSettings())]
    flags = {p: p.requires_grad for p in enc.parameters()}
    try:
        for p in enc.parameters():
            p.requires_grad_(p in set(params))
        # the reference
        criteria = torch.nn.MSELoss()
        adv_text = f"{tok.decode([v]).strip()} {word}"
        e_n = unet(z, t, encoder_hidden_states=enc(ids([adv_text]))[0]).sample
        unlearn = criteria(e_n, e_0 - (ng * (e_p - e_0)))
        retain_e_n = unet(rz, t.expand(2), encoder_hidden_states=enc(ids(retain))[0]).sample
        ref = unlearn + w * criteria(retain_e_n, retain_e_p)
        ref_grads = torch.autograd.grad(ref, params)
        ref_attack = criteria(e_n, e_p)
        # erasekit
        table = enc.get_input_embeddings().weight.detach()
        pred = unet(z, t, **encode(pipe, [word], [table[[v]][None]]).unet_kwargs()).sample
        r_pred = unet(rz, t.expand(2), **encode(pipe, retain).unet_kwargs()).sample
        ours, _, _ = outer_loss(pred, e_0, e_p, ng, r_pred, retain_e_p, w)
        grads = torch.autograd.grad(ours, params)
        assert abs(ours.item() - ref.item()) < 1e-6
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads, ref_grads))
        assert abs(attack_loss(pred, e_p).item() - ref_attack.item()) < 1e-6
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def test_inner_attack_lowers_its_loss(tiny_sd1):
    pipe, unet = tiny_sd1, tiny_sd1.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size), generator=g)
    t = torch.tensor([300, 600])
    with torch.no_grad():
        ep = unet(x, t, **encode(pipe, ["star", "star"]).unet_kwargs()).sample
    s = AdvUnlearnSettings(attack_steps=30, attack_lr=1e-2, attack_tokens=2)
    attack = PrefixAttack(pipe, s, torch.Generator().manual_seed(2))
    flags = [(p, p.requires_grad) for p in pipe.text_encoder.parameters()]
    pipe.text_encoder.requires_grad_(False)
    try:
        prefixes, ids, losses = attack.run(["a photo", "a photo"], lambda: (x, t, ep))
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    assert ids is None and prefixes[0].shape == (2, 2, pipe.text_encoder.config.hidden_size)
    assert float(losses[-1]) < 0.9 * float(losses[0]), (losses[0], losses[-1])


def test_layer_and_component_choices(tiny_sd1, toy_random):
    enc = tiny_sd1.text_encoder
    full = encoder_parameters(enc, AdvUnlearnSettings())
    assert any("final_layer_norm" in n for n in full) and not any("embeddings" in n for n in full)
    attn = encoder_parameters(enc, AdvUnlearnSettings(component="attn"))
    assert attn and all("self_attn" in n for n in attn) and not any("final_layer_norm" in n for n in attn)
    first = encoder_parameters(enc, AdvUnlearnSettings(layers="0", norm_layer=True))
    assert all(".layers.0." in n or "final_layer_norm" in n for n in first) and any("final_layer_norm" in n for n in first)
    ffn = encoder_parameters(toy_random.text_encoder, AdvUnlearnSettings(component="ffn"))  # BERT
    assert ffn and all(".intermediate." in n or (".output." in n and ".attention." not in n) for n in ffn)
    with pytest.raises(ErasekitError, match="has layers 0-"):
        encoder_parameters(enc, AdvUnlearnSettings(layers="0-40"))


def test_retain_prompts_come_from_the_settings_the_preserved_concepts_or_a_fallback(tiny_sd1, tmp_path):
    from erasekit.erasers.concept import ConceptSpec

    spec = ConceptSpec(("star",), "", ())
    assert retain_texts(tiny_sd1, spec, AdvUnlearnSettings(retain_prompts="a cat; a dog"))[0] == ["a cat", "a dog"]
    f = tmp_path / "retain.txt"
    f.write_text("a boat\n\na car\n")
    assert retain_texts(tiny_sd1, spec, AdvUnlearnSettings(retain_file=str(f)))[0] == ["a boat", "a car"]
    kept = ConceptSpec(("star",), "", ("heart",))
    assert retain_texts(tiny_sd1, kept, AdvUnlearnSettings()) == (["heart"], "preserved concepts")
    texts, source = retain_texts(tiny_sd1, spec, AdvUnlearnSettings())
    assert source == "built-in captions" and len(texts) >= 5
    with pytest.raises(ErasekitError, match="no such file"):
        retain_texts(tiny_sd1, spec, AdvUnlearnSettings(retain_file=str(tmp_path / "none.txt")))


@pytest.mark.parametrize("overrides, fragment", [
    ({"iterations": 0}, "iterations=0: must be > 0"), ({"retain_weight": -1}, "retain_weight=-1"),
    ({"negative_guidance": -0.5}, "negative_guidance=-0.5"), ({"lr": -1e-5}, "lr=-1e-05"),
    ({"layers": "attn-only"}, "layers='attn-only'"), ({"layers": "3-1"}, "layers='3-1'"),
    ({"component": "mlp"}, "component must be one of"), ({"attack_space": "pixels"}, "attack_space must be one of"),
    ({"attack_tokens": 0}, "attack_tokens=0"),
])
def test_advunlearn_bad_settings_are_one_clear_error(overrides, fragment):
    with pytest.raises(ErasekitError, match=fragment.replace("(", r"\(")):
        AdvUnlearnSettings().replace(overrides)


def test_cli_advunlearn_bad_setting_exits_2(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    result = CliRunner().invoke(app, ["erase", "--method", "advunlearn", "--concept", "star", "--model", "toy",
                                      "--set", "layers=attention", "--out", str(tmp_path / "o")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: setting layers="), lines


# --- the trained embedded world -------------------------------------------------------------------------------------

def test_advunlearn_lowers_the_star_rate_on_the_embedded_world():
    """A short run (20 outer steps, 3 attack steps each after 5 warm-up steps) on the trained world: far fewer
    stars than the original model draws from the same prompts and seeds, the other shapes mostly kept."""
    from erasekit.generation import generate
    from erasekit.models import load_pipeline
    from erasekit.toy.detector import load_toy_detector, top_labels
    from erasekit.worlds import TOY_WORLD

    pipe = load_pipeline("toy")
    prompts = (TOY_WORLD.concept_prompts("star") * 2)[:24]
    others = [("circle", "a red circle on a plain background"), ("square", "a blue square on a dotted background"),
              ("heart", "a purple heart on a striped background")] * 4

    def labels(texts, seed0):
        images = generate(pipe, texts, [seed0 + i for i in range(len(texts))], batch_size=64, progress=False)
        return [r["shape"] for r in top_labels(load_toy_detector().predict(images))]

    before = labels(prompts, 300)
    edit = erase(pipe, "advunlearn", TOY_WORLD.concept_words("star"),
                 settings={"iterations": 20, "warmup": 5, "attack_steps": 3, "trajectories": 16}, progress=False)
    assert edit.extra["attack"]["rounds"] == 15
    edit.apply(pipe)
    try:
        after = labels(prompts, 300)
        kept = labels([p for _, p in others], 900)
    finally:
        edit.revert(pipe)
    rate_before, rate_after = before.count("star") / len(before), after.count("star") / len(after)
    assert rate_before >= 0.7 and rate_after <= rate_before - 0.4, (rate_before, rate_after)
    assert sum(a == b for a, (b, _) in zip(kept, others)) / len(others) >= 0.75, kept
