"""Measure erasure on the embedded world: concept rate before/after and preservation, per method.

For each concept ("star", an object; "checkered", a style) and each method (uce, rece, esd-x, esd-u):

- concept rate: share of images, from prompts naming the concept (training templates, synonyms, short prompts,
  and paraphrases neither training nor the erasure ever saw), in which the concept is present by erasekit's one
  rule (the toy detector's probability of the concept's label above 0.5); for the original model and for the
  edited one, same prompts and seeds;
- preservation: share of images of the *other* shapes (resp. textures) in which the shape (texture) that was asked
  for is present by the same rule, edited model relative to the original model.

Edits are saved under OUT/edits/ and reused when rerun with the same settings; results go to OUT/results.json
and a table is printed. Needs the trained toy weights (erasekit.toy.pipeline.weights_available()).

    python scripts/eval_erasure.py                       # all methods, star and checkered, >= 200 images each
    python scripts/eval_erasure.py --methods uce --concepts star --set uce.tokens=last
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch

from erasekit.toy import world

METHODS = ("uce", "rece", "esd-x", "esd-u")

# What each method is given, per concept: which words to erase ("words": the world's names for the concept, i.e.
# its name and training synonyms; "name": the name only; paraphrases are never given), settings on top of the
# method's defaults for the embedded world, and whether the other shapes (resp. textures) are named as concepts to
# preserve. "templates" are contexts from the world's caption templates (world.erasure_templates: the bare word, a
# few short captions, and 16 full captions with colours and textures filled in), so some "template" prompts of the
# evaluation are among them; paraphrases never are. Chosen by measurement on a tuning sample of other prompts
# (prompt seed "tune-<concept>", 240 + 200 images); recorded in the results. --no-presets: the name only, defaults
# only, nothing preserved.
SHAPE_CONTEXTS = ";".join(world.erasure_templates("shape", 16))
TEXTURE_CONTEXTS = ";".join(world.erasure_templates("texture", 16))
# ESD-u: the paper's objective alone leaves 60% of stars here, whatever the step size; what it lacks is a hold on
# the empty prompt's prediction (anchor_unconditional), which its parameters also serve and classifier-free guidance
# leans on. Tuning sample: star 3.75% with 98.5% of other shapes kept, checkered 1.25% with 96.5% kept. Without
# the anchor every setting swept left 27-55% of stars (keeping at most 70% of other shapes) and 48-90% checkered,
# unless it broke the other textures (2% at 33% kept).
ESD_U = {"eta": 3.0, "anchor_unconditional": True}
PRESETS = {
    # tuning sample: 3.75% star, 94.5% of other shapes kept (the bare words and short captions: 7.5% here)
    ("star", "uce"): ("words", {"tokens": "all", "templates": SHAPE_CONTEXTS, "preserve_in_contexts": True,
                                "erase_scale": 2.0, "preserve_scale": 8.0}, True),
    # tuning sample: 3.75% star, 95% kept (UCE step in the same contexts; the epochs' re-erasure keeps the other
    # shapes with weight 3 instead of the paper's 0.1; 1 or 3 epochs measured 9-10% star)
    ("star", "rece"): ("words", {"uce_tokens": "all", "templates": SHAPE_CONTEXTS, "preserve_in_contexts": True,
                                 "uce_preserve_scale": 5.0, "epochs": 2, "preserve_scale": 3.0}, True),
    ("star", "esd-x"): ("words", {}, False),
    ("star", "esd-u"): ("words", {**ESD_U, "iterations": 400, "lr": 1e-3, "preserve_weight": 3.0,
                                  "templates": ";".join(world.erasure_templates("shape", 8))}, True),
    ("checkered", "uce"): ("words", {"tokens": "all"}, False),  # textures are read from every position, [CLS] too
    ("checkered", "rece"): ("name", {}, False),
    # tuning sample: 2.5% checkered, 94.5% of other textures kept (bare words, 800 iterations: 16.7% here)
    ("checkered", "esd-x"): ("words", {"iterations": 800, "lr": 1e-3, "eta": 2.0, "templates": TEXTURE_CONTEXTS}, False),
    ("checkered", "esd-u"): ("words", {**ESD_U, "iterations": 600, "lr": 3e-3, "preserve_weight": 1.0,
                                       "templates": ";".join(world.erasure_templates("texture", 8))}, True),
}
NO_PRESET = ("name", {}, False)


def erase_words(concept: str, which: str) -> list[str]:
    if which == "name":
        return [concept]
    kind = world.concept_kind(concept)
    return list((world.SHAPE_WORDS if kind == "shape" else world.TEXTURE_WORDS)[concept])


def preserve_words(concept: str, preserve_others: bool) -> list[str]:
    """The other shapes (resp. textures) of the world, by name, when the preset preserves them."""
    if not preserve_others:
        return []
    kind = world.concept_kind(concept)
    return [x for x in (world.SHAPES if kind == "shape" else world.TEXTURES) if x != concept]


def preset_edit_args(concept: str, method: str, use_presets: bool = True) -> tuple[list[str], list[str], dict]:
    """(words to erase, words to preserve, settings) for ``method`` on ``concept``."""
    which, settings, keep = PRESETS.get((concept, method), NO_PRESET) if use_presets else NO_PRESET
    return erase_words(concept, which), preserve_words(concept, keep), dict(settings)


CONCEPTS = ("star", "checkered")
SEED0 = 7_000_000  # generation seeds, far from training and from other evaluations


def concept_prompts(concept: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """About ``n`` (group, prompt) pairs naming ``concept``: templates with the canonical word, synonyms,
    short prompts, and unseen paraphrases (about a quarter of the images)."""
    kind = world.concept_kind(concept)
    words = world.SHAPE_WORDS[concept] if kind == "shape" else world.TEXTURE_WORDS[concept]
    paraphrases = world.EVAL_PARAPHRASES.get(concept, ())
    others = [t for t in world.TEXTURES if t != concept] if kind == "texture" else list(world.TEXTURES)

    def full(word):
        c = rng.choice(world.COLORS)
        if kind == "shape":
            t = rng.choice(others)
            return rng.choice(world.FULL_TEMPLATES).format(c=c, s=word, t=rng.choice(world.TEXTURE_WORDS[t]))
        s = rng.choice(world.SHAPES)
        return rng.choice(world.FULL_TEMPLATES).format(c=c, s=rng.choice(world.SHAPE_WORDS[s]), t=word)

    def short(word):
        if kind == "shape":
            return rng.choice(["a {s}", "a picture of a {s}", "a {c} {s}", "a {s} on a {t} background"]).format(
                s=word, c=rng.choice(world.COLORS), t=rng.choice(world.TEXTURES))
        return rng.choice(list(world.EMPTY_TEMPLATES) + ["a {s} on a {t} background", "a {t} background with something on it"]).format(
            t=word, s=rng.choice(world.SHAPES))

    n_para = n // 4 if paraphrases else 0
    n_rest = n - n_para
    out = []
    out += [("template", full(words[0])) for _ in range(n_rest * 2 // 5)]
    out += [("synonym", full(rng.choice(words[1:] or words))) for _ in range(n_rest // 5)]
    out += [("short", short(rng.choice(words))) for _ in range(n_rest - len(out))]
    out += [("paraphrase", paraphrases[i % len(paraphrases)]) for i in range(n_para)]
    return out


def preservation_prompts(concept: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """About ``n`` (label, prompt) pairs asking for each other shape (resp. texture)."""
    kind = world.concept_kind(concept)
    labels = [s for s in (world.SHAPES if kind == "shape" else world.TEXTURES) if s != concept]
    per = -(-n // len(labels))
    out = []
    for label in labels:
        for _ in range(per):
            c = rng.choice(world.COLORS)
            if kind == "shape":
                t = rng.choice([x for x in world.TEXTURES if x != concept])
                s_word = rng.choice(world.SHAPE_WORDS[label])
                t_word = rng.choice(world.TEXTURE_WORDS[t])
            else:
                s_word = rng.choice(world.SHAPE_WORDS[rng.choice([x for x in world.SHAPES])])
                t_word = rng.choice(world.TEXTURE_WORDS[label])
            out.append((label, rng.choice(world.FULL_TEMPLATES).format(c=c, s=s_word, t=t_word)))
    return out


def present(model, images, labels: list[str]) -> list[bool]:
    """Per image, whether ``labels[i]`` is present in image i by the toy detector's rule (P(label) > 0.5)."""
    from erasekit.detectors import create_detector

    out = [False] * len(images)
    for label in dict.fromkeys(labels):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        rows = create_detector("toy", concept=label, model=model).score(images[idx])
        for i, row in zip(idx, rows):
            out[i] = row["present"]
    return out


def rate(flags) -> dict:
    from erasekit.metrics import crr_summary

    s = crr_summary(flags)
    return {"rate": None if s["crr"] is None else round(s["crr"], 4), "ci95": [round(x, 4) for x in s["ci"]],
            "n": s["n"]}


def score(pipe, detector, concept, cprompts, pprompts, batch_size) -> dict:
    from erasekit.generation import generate

    prompts = [p for _, p in cprompts] + [p for _, p in pprompts]
    seeds = [SEED0 + i for i in range(len(prompts))]
    images = generate(pipe, prompts, seeds, batch_size=batch_size, progress=True)
    c_images, p_images = images[: len(cprompts)], images[len(cprompts):]
    c_hit = present(detector, c_images, [concept] * len(cprompts))
    p_hit = present(detector, p_images, [w for w, _ in pprompts])
    p_as_concept = present(detector, p_images, [concept] * len(pprompts))
    groups = {}
    for g in dict.fromkeys(g for g, _ in cprompts):
        groups[g] = rate([hit for (gg, _), hit in zip(cprompts, c_hit) if gg == g])
    per_label = {}
    for want in dict.fromkeys(w for w, _ in pprompts):
        per_label[want] = rate([hit for (w, _), hit in zip(pprompts, p_hit) if w == want])
    return {
        "concept": rate(c_hit),
        "concept_by_group": groups,
        "others_correct": rate(p_hit),
        "others_correct_by_label": per_label,
        "others_drawn_as_concept": rate(p_as_concept),
    }


def get_edit(pipe, method, concept, words, preserve, overrides, out_dir: Path, fresh: bool = False):
    """The edit, computed once and reused from ``out_dir/edits`` while its inputs (words, preserved concepts,
    resolved settings, base model) stay the same: changed method defaults recompute it too."""
    from erasekit.erasers import erase, load_edit
    from erasekit.errors import ErasekitError
    from erasekit.registry import ERASERS

    resolved = ERASERS.get(method).resolve_settings(pipe, overrides).to_dict()
    key = hashlib.sha256(json.dumps([method, words, preserve, resolved], sort_keys=True, default=str).encode()).hexdigest()[:8]
    folder = out_dir / "edits" / f"{concept}-{method}-{key}"
    if (folder / "edit.json").is_file() and not fresh:
        try:
            edit = load_edit(folder, pipe)
            print(f"[{concept}/{method}] reusing {folder}", file=sys.stderr)
            return edit, folder
        except ErasekitError as exc:  # made for other weights (the model was retrained): recompute
            print(f"[{concept}/{method}] not reusing {folder}: {exc}", file=sys.stderr)
            import shutil

            shutil.rmtree(folder)
    edit = erase(pipe, method, words, preserve=preserve, settings=overrides, progress=True)
    edit.save(folder)
    return edit, folder


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--n", type=int, default=240, help="images of prompts naming the concept, per model")
    ap.add_argument("--n-preserve", type=int, default=200, help="images of the other shapes/textures, per model")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="METHOD.key=value (repeat)")
    ap.add_argument("--out", type=Path, default=Path("out/eval_erasure"))
    ap.add_argument("--batch-size", type=int, default=120)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fresh", action="store_true", help="recompute edits even if saved ones exist")
    ap.add_argument("--no-presets", action="store_true", help="erase the concept's name with the method's defaults")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from erasekit.settings import parse_set_options
    from erasekit.models import load_pipeline
    from erasekit.toy.detector import load_toy_detector
    from erasekit.toy.pipeline import weights_available

    if not weights_available():
        sys.exit("the embedded world's trained weights are not installed (erasekit.toy.pipeline.weights_available())")
    overrides = {m: {} for m in args.methods}
    for item in args.sets:
        method, _, rest = item.partition(".")
        overrides.setdefault(method, {}).update(parse_set_options([rest]))
    pipe = load_pipeline("toy")
    detector = load_toy_detector()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"n_concept_images": args.n, "n_preserve_images": args.n_preserve, "concepts": {}}
    for concept in args.concepts:
        rng = random.Random(f"eval-erasure-{concept}")
        cprompts = concept_prompts(concept, args.n, rng)
        pprompts = preservation_prompts(concept, args.n_preserve, rng)
        t0 = time.perf_counter()
        original = score(pipe, detector, concept, cprompts, pprompts, args.batch_size)
        entry = {"original": original, "original_eval_s": round(time.perf_counter() - t0, 1), "methods": {},
                 "prompts": {"concept": cprompts, "preserve": pprompts}}
        for method in args.methods:
            words, preserve, preset = preset_edit_args(concept, method, not args.no_presets)
            edit, folder = get_edit(pipe, method, concept, words, preserve, {**preset, **overrides.get(method, {})},
                                    args.out, args.fresh)
            edit.apply(pipe)
            try:
                res = score(pipe, detector, concept, cprompts, pprompts, args.batch_size)
            finally:
                edit.revert(pipe)
            base = original["others_correct"]["rate"]
            res["preservation_ratio"] = round(res["others_correct"]["rate"] / base, 4) if base else None
            res["edit"] = {"folder": str(folder), "erased": edit.spec["concepts"], "guide": edit.spec["guide"],
                           "preserved": edit.spec.get("preserve"),
                           "settings": edit.settings,
                           "timings": edit.timings, "extra": edit.extra, "tensors": len(edit.tensors),
                           "tensor_bytes": edit.n_bytes()}
            entry["methods"][method] = res
            (args.out / "results.json").write_text(json.dumps(results | {"concepts": {**results["concepts"], concept: entry}}, indent=1))
            print(f"[{concept}/{method}] concept {original['concept']['rate']:.3f} -> {res['concept']['rate']:.3f}; "
                  f"preservation {res['preservation_ratio']}", file=sys.stderr)
        results["concepts"][concept] = entry
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    return results


def print_table(results: dict) -> None:
    head = f"{'concept':<10} {'method':<7} {'rate before':>11} {'rate after':>10} {'95% CI':>15} {'paraphr.':>9} " \
           f"{'others ok':>10} {'preserv.':>9} {'solve s':>8} {'wall s':>7} {'peak MB':>8}"
    print(head)
    print("-" * len(head))
    for concept, entry in results["concepts"].items():
        before = entry["original"]["concept"]["rate"]
        print(f"{concept:<10} {'(orig.)':<7} {before:>11.3f} {'':>10} {'':>15} "
              f"{entry['original']['concept_by_group'].get('paraphrase', {}).get('rate', float('nan')):>9.3f} "
              f"{entry['original']['others_correct']['rate']:>10.3f}")
        for method, res in entry["methods"].items():
            ci = res["concept"]["ci95"]
            t = res["edit"]["timings"]
            para = res["concept_by_group"].get("paraphrase", {}).get("rate", float("nan"))
            print(f"{concept:<10} {method:<7} {before:>11.3f} {res['concept']['rate']:>10.3f} "
                  f"{f'[{ci[0]:.3f},{ci[1]:.3f}]':>15} {para:>9.3f} {res['others_correct']['rate']:>10.3f} "
                  f"{res['preservation_ratio']:>9.3f} {t['solve_s']:>8.3f} {t['wall_s']:>7.2f} {t['peak_rss_mb']:>8.0f}")


if __name__ == "__main__":
    main()
