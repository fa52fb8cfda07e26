"""Ring-A-Bell on SD3 and FLUX.1: the concept vector in the family's joint-attention text states (SD3: CLIP-L|G
and T5; FLUX.1: T5), the base prompt's pooled projections kept, both modes end to end."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
from erasekit.diffusion import Target
from erasekit.diffusion.family import family_of

TINY = {"ring_a_bell": {"generations": 2, "population": 6, "max_prompts": 2, "pairs": "6", "length": 4}}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()


def _detector(concept="star"):
    from erasekit.detectors.toy import ToyConceptDetector
    from erasekit.toy.detector import ToyDetector

    torch.manual_seed(0)
    return ToyConceptDetector(concept, model=ToyDetector().eval())


def test_continuous_shifts_the_joint_text_states_and_keeps_the_pooled_projection(flow_pipe, tmp_path):
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.common import StatesTable
    from erasekit.attacks.ring_a_bell import RingABell, concept_pairs

    family = family_of(flow_pipe)
    target = Target(flow_pipe)
    attack = RingABell.from_overrides({"max_prompts": 1, "pairs": 6, "eta": 2.0})
    inputs = attack.inputs(AttackContext(target=target, concept="star", n=2, cache_dir=None), mode="continuous")
    got = inputs.learned.encode(flow_pipe, inputs.prompts[:1])
    # re-typed: v = mean over the pairs of E(with) - E(without), E the family's token states
    pairs = concept_pairs(target.world, "star", 6)
    with torch.no_grad():
        base = family.encode(flow_pipe, [target.world.concept_prompts("star")[0]])
        v = torch.stack([family.encode(flow_pipe, [w]).states[0] - family.encode(flow_pipe, [wo]).states[0]
                         for w, wo in pairs]).mean(0)
    t5 = family.t5_tokens(flow_pipe) if family.name == "sd3" else 32
    assert v.shape == ((77 + t5) if family.name == "sd3" else t5, 48)
    assert v[-t5:].abs().max() > 0  # the vector lives in the T5 states too
    torch.testing.assert_close(got.states, base.states + 2.0 * v, atol=1e-5, rtol=1e-5)
    assert set(got.added) == {"pooled"} and torch.equal(got.added["pooled"], base.added["pooled"])
    # the cache's round trip keeps the family's pooled key
    inputs.learned.save(tmp_path / "states.safetensors")
    again = StatesTable.load(tmp_path / "states.safetensors").encode(flow_pipe, inputs.prompts[:1])
    assert torch.equal(again.states, got.states) and torch.equal(again.added["pooled"], got.added["pooled"])


def test_continuous_images_are_the_shifted_states_images(flow_pipe, tmp_path):
    """End to end: the scenario's images are the ones generated from the shifted states (and cached)."""
    from PIL import Image

    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.ring_a_bell import RingABell
    from erasekit.generation import generate

    target = Target(flow_pipe)
    cfg = ScenarioConfig("ring-a-bell", "star", n=2, steps=2, settings=TINY)
    s = run_scenario(cfg, target, _detector(), tmp_path / "out", progress=False)
    assert s["n"] == 2 and s["attack"]["mode"] == "continuous" and s["attack"]["pairs"] == 6
    again = run_scenario(cfg, target, _detector(), tmp_path / "out", progress=False)
    assert again["generation"]["images_generated"] == 0 and again["attack"]["reused_from_cache"]
    inputs = RingABell.from_overrides(TINY["ring_a_bell"]).inputs(
        AttackContext(target=target, concept="star", n=2, cache_dir=None), mode="continuous")
    want = generate(target, None, inputs.seeds, steps=2, guidance=target.world.sampler_defaults()[1],
                    prompt_embeds=inputs.learned.encode(flow_pipe, inputs.prompts), progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    records.sort(key=lambda r: r["seed"])
    got = np.stack([np.asarray(Image.open(tmp_path / "out" / r["path"])) for r in records])
    assert [r["seed"] for r in records] == inputs.seeds
    assert np.array_equal(got, want)


def test_discrete_search_finds_prompts_without_the_concepts_words(flow_pipe, tmp_path):
    s = run_scenario(ScenarioConfig("ring-a-bell-discrete", "star", n=2, steps=2, settings=TINY),
                     Target(flow_pipe), _detector(), tmp_path, progress=False)
    search = s["attack"]["search"]
    assert s["n"] == 2 and len(search["prompts"]) == 2
    assert all("star" not in q and len(q.split()) == 4 for q in search["prompts"].values())
    assert all(np.isfinite(m) and m > 0 for m in search["mse"].values())
