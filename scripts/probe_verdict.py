"""Lu et al.'s likelihood measure and the avoidance / destruction verdict for a probes bench folder.

The probes' recovery rates are bench cells (`erasekit bench --preset probes-star`, `probes-checkered`); the verdict
needs one thing more than the report shows: the denoising loss of rendered concept images and of control images
(the concept's kind's other labels) under each edit against the original model (`erasekit.probes.verdict`). This
script reads the bench folder's summary.json (each edit's rates and cached edit), computes the losses with the
same edits and prints the likelihood table and the verdicts; with --json it writes them too.

    erasekit bench --preset probes-star --out runs/probes-star
    python scripts/probe_verdict.py runs/probes-star [--n-likelihood 64] [--json runs/probes-star/verdict.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The probe cells the verdict counts (as the probes' own table labels them), by bench scenario.
COUNTED = {"probe-inpainting": "inpainting", "probe-completion": "completion", "probe-noise": "noise",
           "probe-classifier-guidance": "classifier guidance"}
CONCEPT_SEED, CONTROL_SEED = 940_000, 950_000  # rendered images: apart from every bench seed


def control_images(concept: str, n: int):
    """Rendered images of the other labels of the concept's kind, and their prompts."""
    import numpy as np

    from erasekit.attacks.images import render_concept_images
    from erasekit.toy import world
    from erasekit.worlds.toy import ToyWorld

    kind = world.concept_kind(concept)
    labels = [x for x in {"shape": world.SHAPES, "texture": world.TEXTURES, "color": world.COLORS}[kind] if x != concept]
    per = max(1, n // len(labels))
    images, prompts = [], []
    for j, label in enumerate(labels):
        im, _ = render_concept_images(label, per, 32, seed=CONTROL_SEED + 1000 * j)
        images.append(im)
        prompts += [ToyWorld().concept_prompt(label)] * per
    return np.concatenate(images), prompts


def verdicts(folder: Path, n_likelihood: int = 64) -> dict:
    """concept -> method -> {recovery, likelihood, verdict, reason, verdict_without_inpainting}."""
    from erasekit.attacks.images import render_concept_images
    from erasekit.diffusion import Target
    from erasekit.erasers import load_edit
    from erasekit.errors import ErasekitError
    from erasekit.models import load_pipeline
    from erasekit.probes.verdict import denoising_losses, likelihood_gap, verdict
    from erasekit.worlds.toy import ToyWorld

    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    if summary["config"]["model"] != "toy":
        raise ErasekitError(f"{folder}: the likelihood measure renders the embedded world's images (model: toy)")
    k = (summary["config"].get("attacks") or {}).get("completion", {}).get("k")
    labels = dict(COUNTED, **({"probe-completion": f"completion k={k}"} if k else {}))  # eval_probes.md's labels
    pipe = load_pipeline("toy")
    base = Target(pipe, model="toy")
    out: dict = {}
    for concept, methods in summary["tables"]["crr"].items():
        images, _ = render_concept_images(concept, n_likelihood, 32, seed=CONCEPT_SEED)
        prompts = [ToyWorld().concept_prompt(concept)] * len(images)
        ctrl, ctrl_prompts = control_images(concept, n_likelihood)
        orig = denoising_losses(base, images, prompts)
        orig_ctrl = denoising_losses(base, ctrl, ctrl_prompts)
        for method, cells in methods.items():
            info = summary.get("edits", {}).get(f"{concept}/{method}")
            if info is None:
                continue  # the original model (or a defence without an edit): nothing to compare
            target = base.with_edits(load_edit(folder / info["folder"], pipe))
            gap = likelihood_gap(denoising_losses(target, images, prompts), orig,
                                 denoising_losses(target, ctrl, ctrl_prompts), orig_ctrl)
            rec = {label: cells[sc]["crr"] for sc, label in labels.items() if sc in cells}
            v, why = verdict(rec, gap)
            out.setdefault(concept, {})[method] = {
                "recovery": rec, "likelihood": gap, "verdict": v, "reason": why,
                # a texture fills the whole image, so inpainting's unmasked part alone shows it: without it too
                "verdict_without_inpainting": verdict({k: x for k, x in rec.items() if k != "inpainting"}, gap)[0]}
    return out


def table(results: dict, n_likelihood: int) -> str:
    lines = [f"Likelihood (denoising loss erased / original, mean over timesteps, on {n_likelihood} concept images and "
             "as many control images; gap = concept ratio / control ratio - 1) and the verdict:", "",
             "| concept | model | uncond ratio concept / control | gap | cond ratio concept / control | gap | verdict | "
             "verdict without inpainting | why |", "|---|---|---|---|---|---|---|---|---|"]
    for concept, methods in results.items():
        for method, r in methods.items():
            u, c = r["likelihood"]["uncond"], r["likelihood"]["cond"]
            lines.append(f"| {concept} | {method} | {u['ratio_concept']:.3f} / {u['ratio_control']:.3f} | "
                         f"{u['gap']:+.3f} | {c['ratio_concept']:.3f} / {c['ratio_control']:.3f} | {c['gap']:+.3f} | "
                         f"{r['verdict']} | {r['verdict_without_inpainting']} | {r['reason']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a bench results folder of probes-<concept> (summary.json)")
    ap.add_argument("--n-likelihood", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results = verdicts(args.folder, args.n_likelihood)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results, args.n_likelihood))
    return results


if __name__ == "__main__":
    main()
