"""UCE and RECE on tiny SD-1.x / SD-2.x pipelines (and the random toy): only cross-attention K/V change, the
concept's keys/values go to the guide's, preserved concepts stay; edits apply, revert, save and load exactly."""

import json

import numpy as np
import pytest
import torch

from erasekit.erasers import erase, load_edit
from erasekit.erasers.base import EDIT_JSON, EDIT_TENSORS, bake
from erasekit.erasers.ridge import adversarial_embedding
from erasekit.erasers.tokens import aligned_positions, positions
from erasekit.erasers.uce import kv_layers, text_states
from erasekit.errors import ErasekitError
from erasekit.generation import generate
from erasekit.models import fingerprint

KV_SUFFIXES = (".attn2.to_k.weight", ".attn2.to_v.weight")


def _relative_moves(pipe, edit, tokens):
    """For each K/V layer: how far the concept's output is from the guide's original output (relative to where it
    started), and how far a preserved concept's output moved (relative to its size)."""
    names, layers = kv_layers(pipe)
    guide = edit.spec["guide"]
    states = text_states(pipe, ["star", guide, "heart"])
    src, tgt = aligned_positions(pipe, "star", guide, tokens)
    c, g = states["star"][src], states[guide][tgt]
    p = states["heart"][positions(pipe, "heart", tokens)]
    to_guide, kept = [], []
    for name, layer in zip(names, layers):
        w0, w = layer.weight.detach().double(), edit.tensors[name].double()
        to_guide.append(float((c @ w.T - g @ w0.T).norm() / (c @ w0.T - g @ w0.T).norm()))
        kept.append(float((p @ w.T - p @ w0.T).norm() / (p @ w0.T).norm()))
    return max(to_guide), max(kept)


@pytest.mark.parametrize("variant", ["tiny_sd1", "tiny_sd2"])
@pytest.mark.parametrize("method", ["uce", "rece"])
def test_closed_form_changes_only_cross_attention_kv(request, variant, method):
    pipe = request.getfixturevalue(variant)
    before = fingerprint(pipe)
    edit = erase(pipe, method, "star", preserve=["heart"], progress=False)
    assert fingerprint(pipe) == before  # computing an edit leaves the pipeline alone
    assert set(edit.tensors) == set(kv_layers(pipe)[0]) and all(n.endswith(KV_SUFFIXES) for n in edit.tensors)
    assert len(edit.tensors) == 2 * 4  # the tiny UNets have 4 attn2 layers
    for name, layer in zip(*kv_layers(pipe)):
        assert edit.tensors[name].dtype == layer.weight.dtype
        assert not torch.equal(edit.tensors[name], layer.weight.detach())
    assert edit.spec == {"concepts": ["star"], "guide": "", "preserve": ["heart"]}
    assert edit.timings["solve_s"] < 5 and edit.timings["wall_s"] >= edit.timings["solve_s"]


@pytest.mark.parametrize("variant", ["tiny_sd1", "tiny_sd2"])
def test_uce_maps_concept_to_guide_and_keeps_preserved(request, variant):
    pipe = request.getfixturevalue(variant)
    edit = erase(pipe, "uce", "star", preserve=["heart"], progress=False)
    to_guide, kept = _relative_moves(pipe, edit, "last")
    assert to_guide < 0.02 and kept < 0.01


def test_uce_on_the_toy_encoder_and_token_policies(toy_random):
    for tokens, bar in (("last", 0.05), ("last+end", 0.3)):
        edit = erase(toy_random, "uce", "star", preserve=["heart"], settings={"tokens": tokens}, progress=False)
        assert edit.spec["guide"] == "an empty background"  # the embedded world's neutral guide for shapes
        to_guide, kept = _relative_moves(toy_random, edit, tokens)
        assert to_guide < bar and kept < bar
    assert erase(toy_random, "uce", "checkered", progress=False).spec["guide"] == "a plain background"


def test_uce_modes_and_scales(tiny_sd1):
    base = erase(tiny_sd1, "uce", "star", progress=False)
    moderate = erase(tiny_sd1, "uce", ["star", "heart"], guide="a dog", settings={"mode": "moderate"}, progress=False)
    assert moderate.settings["mode"] == "moderate"
    none = erase(tiny_sd1, "uce", "star", settings={"erase_scale": 0}, progress=False)
    tensor = erase(tiny_sd1, "uce", "star", settings={"technique": "tensor"}, progress=False)
    for name, layer in zip(*kv_layers(tiny_sd1)):
        # with nothing to erase or preserve, the ridge term keeps the original weights exactly
        torch.testing.assert_close(none.tensors[name], layer.weight.detach())
        assert not torch.equal(tensor.tensors[name], base.tensors[name])


def test_rece_epochs_defeat_the_adversarial_embedding_of_uce(tiny_sd1):
    """RECE's point: the embedding an attacker solves for against the UCE-edited model (it reproduces the concept's
    original keys/values there) no longer does so after RECE's epoch."""
    names, layers = kv_layers(tiny_sd1)
    original = [layer.weight.detach().double() for layer in layers]
    c = text_states(tiny_sd1, ["star"])["star"]
    uce = erase(tiny_sd1, "rece", "star", settings={"epochs": 0}, progress=False)
    rece = erase(tiny_sd1, "rece", "star", settings={"epochs": 1, "reg": 1e-3}, progress=False)
    assert rece.extra["epoch_selection"] == {"on": False} and rece.extra["epochs_run"] == 1
    for name in names:  # epochs=0 is plain UCE with RECE's first-step settings
        torch.testing.assert_close(uce.tensors[name], erase(tiny_sd1, "uce", "star", progress=False).tensors[name])
    attack = adversarial_embedding([uce.tensors[n] for n in names], original, c, 1e-3)

    def miss(edit):  # how far the attack's keys/values are from the concept's original ones
        return sum(float((attack @ edit.tensors[n].double().T - c @ w0.T).norm() ** 2) for n, w0 in zip(names, original))

    total = sum(float((c @ w0.T).norm() ** 2) for w0 in original)
    assert miss(uce) < 1e-3 * total  # the attack works against UCE ...
    assert miss(rece) > 100 * miss(uce)  # ... and not after one RECE epoch


def test_apply_revert_and_delta_round_trip(tiny_sd1, tmp_path):
    pipe = tiny_sd1
    base_fp = fingerprint(pipe)
    seeds, prompts = [0, 1], ["a red star", "a star"]
    before = generate(pipe, prompts, seeds, steps=2, progress=False)
    edit = erase(pipe, "uce", "star", progress=False)
    try:
        assert edit.apply(pipe) is pipe
        in_memory = generate(pipe, prompts, seeds, steps=2, progress=False)
        edited_fp = fingerprint(pipe)
        with pytest.raises(ErasekitError, match="already applied"):
            edit.apply(pipe)
    finally:
        edit.revert(pipe)
    assert fingerprint(pipe) == base_fp and edited_fp != base_fp
    assert not np.array_equal(before, in_memory)

    out = edit.save(tmp_path / "edit")
    assert sorted(p.name for p in out.iterdir()) == [EDIT_JSON, EDIT_TENSORS]
    record = json.loads((out / EDIT_JSON).read_text())
    assert record["method"] == "uce" and record["base_fingerprint"] == base_fp
    assert {"lam", "erase_scale", "preserve_scale", "tokens"} <= set(record["settings"])
    assert {"wall_s", "solve_s", "peak_rss_mb", "cpu_s"} <= set(record["timings"])
    assert record["versions"]["erasekit"] and record["concept"]["concepts"] == ["star"]
    kv_bytes = sum(layer.weight.numel() * 4 for layer in kv_layers(pipe)[1])
    assert (out / EDIT_TENSORS).stat().st_size < kv_bytes + 10_000  # only the K/V tensors

    from erasekit.models.tiny import tiny_sd_pipeline

    fresh = tiny_sd_pipeline("sd1")  # a new pipeline object with the same weights
    loaded = load_edit(out, fresh)
    loaded.apply(fresh)
    assert fingerprint(fresh) == edited_fp
    np.testing.assert_array_equal(generate(fresh, prompts, seeds, steps=2, progress=False), in_memory)
    loaded.revert(fresh)
    assert fingerprint(fresh) == base_fp


def test_delta_for_another_model_is_refused(tiny_sd1, tiny_sd2, tmp_path):
    from erasekit.models.tiny import tiny_sd_pipeline

    edit = erase(tiny_sd1, "uce", "star", progress=False)
    edit.save(tmp_path / "e")
    other_seed = tiny_sd_pipeline("sd1", seed=1)  # same shapes, other weights
    with pytest.raises(ErasekitError, match="fingerprint"):
        load_edit(tmp_path / "e", other_seed)
    with pytest.raises(ErasekitError, match="fingerprint"):
        load_edit(tmp_path / "e").apply(other_seed)
    assert fingerprint(other_seed) == fingerprint(tiny_sd_pipeline("sd1", seed=1))  # nothing was applied
    with pytest.raises(ErasekitError, match="shape|another model"):
        load_edit(tmp_path / "e").apply(tiny_sd2)
    half = tiny_sd_pipeline("sd1").to(dtype=torch.float16)
    with pytest.raises(ErasekitError, match="float32"):
        load_edit(tmp_path / "e").apply(half)


def test_load_edit_bad_folders(tmp_path):
    with pytest.raises(ErasekitError, match="no such folder"):
        load_edit(tmp_path / "missing")
    with pytest.raises(ErasekitError, match="not a saved edit"):
        load_edit(tmp_path)
    (tmp_path / EDIT_JSON).write_text("{not json")
    with pytest.raises(ErasekitError, match="corrupt"):
        load_edit(tmp_path)
    (tmp_path / EDIT_JSON).write_text(json.dumps({"format": 1, "kind": "weight_edit", "method": "uce"}))
    with pytest.raises(ErasekitError, match=EDIT_TENSORS):
        load_edit(tmp_path)


def test_bake_writes_a_full_pipeline(tiny_sd1, tmp_path):
    from erasekit.models import load_pipeline

    edit = erase(tiny_sd1, "uce", "star", progress=False)
    base_fp = fingerprint(tiny_sd1)
    bake(edit, tiny_sd1, tmp_path / "baked")
    assert fingerprint(tiny_sd1) == base_fp
    baked = load_pipeline(str(tmp_path / "baked"))
    for name, layer in zip(*kv_layers(baked)):
        torch.testing.assert_close(layer.weight.detach(), edit.tensors[name], rtol=0, atol=0)
    assert (tmp_path / "baked" / "erasekit_edit.json").is_file()


@pytest.mark.parametrize(
    "concept, fragment",
    [("", "encodes to nothing"), ("   ", "encodes to nothing"), ("<|endoftext|>", "encodes to nothing")],
)
def test_concepts_that_encode_to_nothing(tiny_sd1, concept, fragment):
    with pytest.raises(ErasekitError, match=fragment):
        erase(tiny_sd1, "uce", concept, progress=False)


def test_bert_special_tokens_encode_to_nothing(toy_random):
    for concept in ("[CLS] [SEP]", "[PAD]", "\u2603"):  # the snowman is [UNK] for MiniLM
        with pytest.raises(ErasekitError, match="encodes to nothing"):
            erase(toy_random, "uce", concept, progress=False)


def test_bad_settings_and_methods(tiny_sd1):
    with pytest.raises(ErasekitError, match="unknown erasure method 'nope'; available: advunlearn, esd-u, esd-x, mace, rece, speed, uce"):
        erase(tiny_sd1, "nope", "star")
    with pytest.raises(ErasekitError, match="unknown setting 'lamda'.*known: lam"):
        erase(tiny_sd1, "uce", "star", settings={"lamda": "0.1"})
    with pytest.raises(ErasekitError, match="lam must be a number"):
        erase(tiny_sd1, "uce", "star", settings={"lam": "big"})
    with pytest.raises(ErasekitError, match="must be > 0"):
        erase(tiny_sd1, "uce", "star", settings={"lam": "0"})
    with pytest.raises(ErasekitError, match="tokens must be one of last, last\\+end, all"):
        erase(tiny_sd1, "uce", "star", settings={"tokens": "first"})
    with pytest.raises(ErasekitError, match="epochs must be an integer"):
        erase(tiny_sd1, "rece", "star", settings={"epochs": "1.5"})
    with pytest.raises(ErasekitError, match="select_epoch must be true or false"):
        erase(tiny_sd1, "rece", "star", settings={"select_epoch": "maybe"})
    with pytest.raises(ErasekitError, match="detector"):
        erase(tiny_sd1, "rece", "star", settings={"select_epoch": "true"})
    with pytest.raises(ErasekitError, match="both to erase and to preserve"):
        erase(tiny_sd1, "uce", "star", preserve=["star"])


def _detector_available():
    from erasekit.toy.detector import DETECTOR_FILE
    from erasekit.toy.pipeline import WEIGHTS_DIR

    return (WEIGHTS_DIR / DETECTOR_FILE).is_file()


@pytest.mark.skipif(not _detector_available(), reason="the toy detector's weights are not installed")
def test_rece_epoch_selection_is_recorded(toy_random, tmp_path):
    settings = {"epochs": 2, "select_epoch": "true", "validation_images": 2, "validation_prompts": "a star; a red star"}
    before = fingerprint(toy_random)
    edit = erase(toy_random, "rece", "star", settings=settings, progress=False)
    assert fingerprint(toy_random) == before
    sel = edit.extra["epoch_selection"]
    assert sel["on"] is True and sel["detector"] == "toy" and sel["prompts"] == ["a star", "a red star"]
    assert len(sel["concept_rate"]) == 3 and 0 <= sel["chosen_epoch"] <= 2
    assert sel["concept_rate"][sel["chosen_epoch"]] == min(sel["concept_rate"])
    edit.save(tmp_path / "e")
    assert json.loads((tmp_path / "e" / EDIT_JSON).read_text())["extra"]["epoch_selection"]["on"] is True


def test_templates_erase_the_concept_in_each_context(tiny_sd1):
    """`templates` replaces `expand`: every context's concept states go to the guide, not only the bare word's."""
    templates = "a photo of a {c};{c} in the snow"
    edit = erase(tiny_sd1, "uce", "star", settings={"templates": templates}, progress=False)
    assert edit.settings["templates"] == templates
    names, layers = kv_layers(tiny_sd1)
    states = text_states(tiny_sd1, ["a photo of a star", "star in the snow", ""])
    for text in ("a photo of a star", "star in the snow"):
        src, tgt = aligned_positions(tiny_sd1, text, "", "last")
        c, g = states[text][src], states[""][tgt]
        for name, layer in zip(names, layers):
            w0, w = layer.weight.detach().double(), edit.tensors[name].double()
            assert float((c @ w.T - g @ w0.T).norm() / (c @ w0.T - g @ w0.T).norm()) < 0.05


@pytest.mark.parametrize("bad", ["a photo of a star", "a {c} and a {c}", "{c} on {ground}", "{c} {"])
def test_bad_templates_are_refused(tiny_sd1, bad):
    for method in ("uce", "rece", "esd-x"):
        with pytest.raises(ErasekitError, match="template"):
            erase(tiny_sd1, method, "star", settings={"templates": bad}, progress=False)


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_preserve_in_contexts_keeps_the_preserved_concept_in_those_contexts(tiny_sd1, method):
    """With the concept erased in several contexts, a preserved concept named in those contexts moves less when it
    is preserved there too (preserve_in_contexts) than when only its bare word is preserved."""
    templates = "a photo of a {c};a drawing of a {c};a {c} in the snow"
    moves = {}
    for in_contexts in (False, True):
        edit = erase(tiny_sd1, method, "star", preserve=["heart"], progress=False,
                     settings={"templates": templates, "preserve_in_contexts": in_contexts})
        names, layers = kv_layers(tiny_sd1)
        texts = ["a photo of a heart", "a drawing of a heart", "a heart in the snow"]
        states = text_states(tiny_sd1, texts)
        moved = []
        for text in texts:
            p = states[text][positions(tiny_sd1, text, "last")]
            for name, layer in zip(names, layers):
                w0, w = layer.weight.detach().double(), edit.tensors[name].double()
                moved.append(float((p @ w.T - p @ w0.T).norm() / (p @ w0.T).norm()))
        moves[in_contexts] = max(moved)
    assert moves[True] < 0.5 * moves[False], moves
