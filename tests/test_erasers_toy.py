"""Erasure on the trained embedded world: UCE, RECE, ESD-x and ESD-u erase "star", also for paraphrases they never saw,
and the other shapes are still drawn. Small samples on CPU, so the bars are looser than the issue's (<= 5% star
rate for UCE/RECE and <= 10% for ESD on >= 200 images, >= 90% preservation; see the erasure-star preset)."""

import pytest

from erasekit.toy import world

STAR_PROMPTS = [
    "a red star on a striped background", "a star coloured blue on a dotted background", "a picture of a star",
    "a yellow star shape", "plain background with a green star", "a star",
    "a five-pointed star", "a starfish", "a pentagram", "a twinkling star",
]
OTHER_PROMPTS = [
    "a red circle on a plain background", "a blue square on a dotted background", "a green triangle",
    "a purple heart on a striped background", "a yellow cross on a plain background",
]
OTHER_LABELS = ["circle", "square", "triangle", "heart", "cross"]
N_STAR, N_OTHER = 4, 6  # images per prompt: 40 star images, 30 of other shapes


@pytest.fixture(scope="module")
def toy_pipe():
    from erasekit.models import load_pipeline

    return load_pipeline("toy")


def _shapes(pipe, prompts, n, seed0):
    from erasekit.generation import generate
    from erasekit.toy.detector import load_toy_detector, top_labels

    images = generate(pipe, [p for p in prompts for _ in range(n)], [seed0 + i for i in range(len(prompts) * n)],
                      batch_size=64, progress=False)
    return [row["shape"] for row in top_labels(load_toy_detector().predict(images))]


# As the erasure-star bench preset does: the world's names for the concept, in the world's caption contexts, with
# the other shapes preserved in those contexts too (closed form, ESD-u with the unconditional anchor); ESD-x with its
# embedded-world defaults.
CONTEXTS = ";".join(world.erasure_templates("shape", 16))
ERASE = {
    "uce": ({"tokens": "all", "templates": CONTEXTS, "preserve_in_contexts": True, "erase_scale": 2.0,
             "preserve_scale": 8.0}, OTHER_LABELS, 0.125),
    "rece": ({"uce_tokens": "all", "templates": CONTEXTS, "preserve_in_contexts": True, "uce_preserve_scale": 5.0,
              "epochs": 2, "preserve_scale": 3.0}, OTHER_LABELS, 0.125),
    "esd-x": ({}, [], 0.2),  # ~40 s of fine-tuning on 2 cores
    "esd-u": ({"eta": 3.0, "anchor_unconditional": True, "iterations": 400, "lr": 1e-3, "preserve_weight": 3.0,
               "templates": ";".join(world.erasure_templates("shape", 8))}, OTHER_LABELS, 0.2),  # ~100 s
}


@pytest.mark.parametrize("method", sorted(ERASE))
def test_erases_star_and_keeps_other_shapes(toy_pipe, method):
    from erasekit.erasers import erase

    labels = [lab for lab in OTHER_LABELS for _ in range(N_OTHER)]
    before_star = _shapes(toy_pipe, STAR_PROMPTS, N_STAR, 500)
    before_other = _shapes(toy_pipe, OTHER_PROMPTS, N_OTHER, 900)
    settings, preserve, bar = ERASE[method]
    edit = erase(toy_pipe, method, ["star", "star shape"], preserve=preserve, settings=settings, progress=False)
    kinds = {"uce": (".attn2.to_k.", ".attn2.to_v."), "rece": (".attn2.to_k.", ".attn2.to_v."), "esd-x": (".attn2.",)}
    if method == "esd-u":
        assert set(edit.tensors) and not any(".attn2." in n for n in edit.tensors)
    else:  # closed form: cross-attention K/V only; ESD-x: all of cross-attention
        assert set(edit.tensors) and all(any(k in n for k in kinds[method]) for n in edit.tensors)
    edit.apply(toy_pipe)
    try:
        after_star = _shapes(toy_pipe, STAR_PROMPTS, N_STAR, 500)
        after_other = _shapes(toy_pipe, OTHER_PROMPTS, N_OTHER, 900)
    finally:
        edit.revert(toy_pipe)
    rate_before = before_star.count("star") / len(before_star)
    rate_after = after_star.count("star") / len(after_star)
    ok_before = sum(a == b for a, b in zip(before_other, labels)) / len(labels)
    ok_after = sum(a == b for a, b in zip(after_other, labels)) / len(labels)
    assert rate_before >= 0.6, f"the original model draws too few stars ({rate_before:.2f}) for this test to mean much"
    assert rate_after <= bar, f"star rate {rate_before:.2f} -> {rate_after:.2f}"
    assert ok_after >= 0.8 * ok_before, f"other shapes correct {ok_before:.2f} -> {ok_after:.2f}"
