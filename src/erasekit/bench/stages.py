"""The bench's stages, each a function the runner (`erasekit.bench.run`) calls in order:

    edits        `make_targets`: each (concept, method) weight edit, cached under ``cache/edits/`` by method +
                 words + preserve + resolved settings + base fingerprint, and its target (edit + defences)
    attacks      `plan_jobs`: each cell's image jobs, with the attack inputs (learned tokens, inverted latents:
                 cached by content under ``cache/``) that attack cells generate from
    generation   `generate_cells`: every cell through `erasekit.generation.generate_to_dir` into the image store
                 ``images/`` (one key, one layout, one resume rule with ``erasekit generate`` and ``erasekit attack``)
    scoring      `score_jobs`: the detector on every image without a row in ``results.jsonl``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from erasekit.bench.layout import IMAGES_DIR, image_path
from erasekit.bench.plan import REFERENCE, Cell, Job, attack_jobs, csv_jobs, preservation_jobs, sampling_fields
from erasekit.bench.words import edit_words, preserved_words
from erasekit.store import content_key


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0, dynamic_ncols=True)


def image_target_id(target, cfg) -> str:
    """What a job's image key knows of the model (`erasekit.generation.target_key`, marked in fast mode)."""
    from erasekit.generation import target_key

    from erasekit.bench.spec import fast_value

    return target_key(target, fast_value(cfg))  # "auto" is resolved by the runner before any key is made


# -- detectors -----------------------------------------------------------------------------------------------
def make_detector(cfg, world, concept: str):
    from erasekit.detectors import create_detector, parse_spec

    spec = cfg.detector.spec() or world.default_detector(concept)
    settings = dict(cfg.detector.settings)
    if getattr(parse_spec(spec)[0], "spec_settings", False) and cfg.device != "auto":
        settings.setdefault("device", cfg.device)  # a judge scores on the device that generates
    return create_detector(spec, concept=concept, threshold=cfg.detector.threshold, **settings)


def label_detector(cfg, world, label: str | None):
    """A detector for a preservation prompt's label, when the detector takes a concept; else None."""
    from erasekit.registry import DETECTORS

    if not label:
        return None
    spec = cfg.detector.spec() or world.default_detector(label)
    cls, preset = DETECTORS.split(spec)
    if not getattr(cls, "needs_concept", False) or preset is not None:
        return None
    return make_detector(cfg, world, label)


# -- edits ------------------------------------------------------------------------------------------------------
def edit_key(method: str, words, preserve, resolved: dict, base_fingerprint: str) -> str:
    return content_key("edit", method, list(words), list(preserve), resolved, base_fingerprint)


def get_edit(target, method: str, words, preserve, settings: dict, cache: Path, progress: bool):
    """(edit, computed?, folder) from ``cache/edits`` or computed and saved there."""
    from erasekit.erasers import erase, load_edit
    from erasekit.registry import ERASERS

    resolved = ERASERS.get(method).resolve_settings(target.pipe, settings, words).to_dict()
    key = edit_key(method, words, preserve, resolved, target.base_fingerprint)
    folder = cache / "edits" / f"{method}-{key}"
    if (folder / "edit.json").is_file():
        return load_edit(folder), False, folder
    with target.original().active():
        edit = erase(target.pipe, method, words, preserve=preserve, settings=settings, progress=progress)
    edit.save(folder)
    return edit, True, folder


def method_defences(mcfg, concept: str) -> list:
    from erasekit.bench.spec import defence_settings
    from erasekit.registry import DEFENCES

    out = []
    for d in mcfg.defences:
        cls = DEFENCES.get(d.name)
        out.append(cls.from_overrides(defence_settings(cls, d.settings, concept)))
    return out


def make_targets(cfg, target0, world, concepts, groups, out: Path, cache: Path, progress: bool):
    """(targets by (concept, method label), edit records by the same, edits computed this run). ``groups``: the
    members of entries that erase several concepts at once (`erasekit.bench.groups`), by member name."""
    targets: dict[tuple[str, str], Any] = {}
    edit_info: dict[tuple[str, str], dict] = {}
    pairs = [(c, m) for c in concepts for m in cfg.methods]
    bar = progress_bar(len(pairs), "edits", progress, unit="edit")
    computed = 0
    for concept, m in pairs:
        edit = None
        if m.edit_name() != "original":
            words = edit_words(m.words, world, concept)
            preserve = preserved_words(m.preserve, world, concept, m.edit_name())
            if concept in groups:  # the group's one edit (the same key for every member: computed once)
                words, preserve = groups[concept].words_and_preserve(m, world)
            edit, fresh, folder = get_edit(target0, m.edit_name(), words, preserve, m.settings, cache, progress)
            computed += fresh
            edit_info[(concept, m.name)] = {
                "method": edit.method, "digest": edit.digest(), "words": words, "preserve": preserve,
                "settings": edit.settings, "timings": edit.timings, "computed_this_run": fresh,
                "folder": str(folder.relative_to(out))}
        targets[(concept, m.name)] = target0.original().with_edits(edit).with_defences(*method_defences(m, concept))
        bar.update(1)
    bar.close()
    return targets, edit_info, computed


# -- attack inputs and jobs ---------------------------------------------------------------------------------------
def attack_settings(cfg) -> dict[str, dict]:
    from erasekit.attacks.scenarios import split_settings

    return split_settings({f"{a}.{k}": v for a, values in cfg.attacks.items() for k, v in (values or {}).items()})


def cell_target(cell: Cell, targets, target0):
    return target0.original() if cell.kind == REFERENCE else targets[(cell.concept, cell.method)]


def plan_jobs(cfg, plan: list[Cell], concepts, targets, target0, world, detectors, settings_by_attack, steps: int,
              guidance: float, cache: Path, progress: bool):
    """(jobs in plan order, attack inputs by cell, what each cell records in the summary)."""
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.scenarios import attack_of
    from erasekit.diffusion.support import check_runs_on
    from erasekit.bench.quality import prompt_rows
    from erasekit.bench.spec import fast_value
    from erasekit.generation import target_fields
    from erasekit.metrics import measure_cost

    quality_rows = prompt_rows(cfg)
    jobs: list[Job] = []
    sources: dict[Cell, Any] = {}  # cell -> AttackInputs (latents / learned vectors for generation)
    cell_info: dict[str, dict] = {}

    def attack_setup(cell):
        ccfg, target = concepts[cell.concept], cell_target(cell, targets, target0)
        cls, args = attack_of(cell.scenario)
        check_runs_on(cls, "attack", target.pipe)
        overrides = dict(settings_by_attack.get(cls.name, {}))
        if cls.name == "text" and ccfg.target_prompts and "prompts" not in overrides:
            overrides["prompts"] = ";".join(ccfg.target_prompts)
        attack = cls.from_overrides(overrides)
        csv_ok = ccfg.prompts_csv and cls.name in ("text", "unlearndiffatk")  # the rows' prompts and seeds
        ctx = AttackContext(target=target, concept=cell.concept, n=cfg.images_per_cell, seed=cfg.seed,
                            steps=cfg.sampler.steps, batch_size=cfg.attack_batch_size,
                            images_folder=Path(ccfg.images) if ccfg.images else None,
                            prompts_csv=Path(ccfg.prompts_csv) if csv_ok else None,
                            detector=detectors[cell.concept],  # attacks that check success in their loop
                            cache_dir=cache, progress=progress)
        return cls, args, attack, ctx

    setups = {cell: attack_setup(cell) for cell in plan if cell.kind == "attack"}
    prepare_attacks(setups.values())
    bar = progress_bar(len(setups), "attacks", progress, unit="cell")
    for cell in plan:
        ccfg = concepts[cell.concept]
        target = cell_target(cell, targets, target0)
        fields = target_fields(target, fast_value(cfg))  # fast and precision (fp8) recorded in every row
        who = (fields["target"], sampling_fields(fields))
        if cell.kind != "attack":
            pp = ([(p.label, p.prompt) for p in ccfg.preserve_prompts] if ccfg.preserve_prompts is not None
                  else world.preservation_prompts(cell.concept))
            if quality_rows is not None:  # quality.prompts: a COCO-captions CSV, each row with its seed
                jobs += csv_jobs(cell, quality_rows, cfg.preservation.images or len(quality_rows), cfg.seed, steps,
                                 guidance, *who)
                cell_info[cell.id] = {"target": target.describe(), "prompts": cfg.quality.prompts}
                continue
            if not pp:
                cell_info[cell.id] = {"skipped": "no preservation prompts for this concept"}
                continue
            jobs += preservation_jobs(cell, pp, cfg.preservation_images(), cfg.seed, steps, guidance, *who)
            cell_info[cell.id] = {"target": target.describe()}
            continue
        cls, args, attack, ctx = setups[cell]
        with measure_cost() as acost:
            inputs = attack.inputs(ctx, **args)
        gen_steps = int(inputs.budget.get("inversion_steps", steps)) if inputs.latents is not None else steps
        sources[cell] = inputs
        jobs += attack_jobs(cell, inputs, gen_steps, guidance, *who)
        cell_info[cell.id] = {"target": target.describe(), "attack": inputs.attack,
                              "attack_settings": attack.settings.to_dict(),
                              "budget": {k: v for k, v in inputs.budget.items()},
                              "this_run": acost.as_dict(), "notes": list(ctx.notes)}
        bar.update(1)
    bar.close()
    return jobs, sources, cell_info


def prepare_attacks(setups) -> None:
    """Attacks that learn several cells' inputs together (textual inversion: the tokens of one model state in one
    batched loop) do it before the cells ask for them one by one; ``setups``: (class, args, attack, ctx) per cell."""
    by_class: dict[type, list] = {}
    for cls, args, attack, ctx in setups:
        if hasattr(cls, "prepare"):
            by_class.setdefault(cls, []).append((attack, ctx, args))
    for cls, items in by_class.items():
        cls.prepare(items)


# -- generation ---------------------------------------------------------------------------------------------------
# Defences whose every row is sampled on its own (per-row masks, noise from the row's seed, elementwise guidance):
# their cells can share batches. dual_reconstruction and safree decide for a whole batch (whether any prompt names
# the concept, whether any row is projected), so their cells keep batches of their own.
ROW_WISE_DEFENCES = frozenset({"negative_prompt", "sld", "irece"})


def resolve_batching(batching: str, device, fast: bool) -> str:
    """``auto``: batches shared across cells on CUDA or in fast mode (full, fixed-size batches: one compiled shape,
    a busy GPU), per cell on the CPU (the batches, speed and float bits of before)."""
    import torch

    if batching != "auto":
        return batching
    return "shared" if fast or torch.device(device).type == "cuda" else "cell"


def shares_batches(target) -> bool:
    return all(getattr(d, "name", None) in ROW_WISE_DEFENCES for d in target.defences)


def generate_cells(jobs: list[Job], targets, target0, sources, out: Path, guidance: float, batch_size: int,
                   fast: bool, share: tuple[int, int] = (0, 1), progress: bool = False, batching: str = "cell",
                   timings: list | None = None, evals=None) -> int:
    """Generate every cell's images not yet in the store ``out/images`` (this process's share of each cell, see
    `generate_to_dir`); returns how many were generated. Cells that share an image key share its file.
    ``guidance``: the bench's, for attack items without their own (an I2P row's).
    ``batching``: ``cell`` (each cell's images batched on their own) or ``shared``: the cells of one model state
    (the same target key: weights, edits, defences) batched together, across methods and scenarios
    (`erasekit.generation.generate_parts_to_dir`), each batch padded to ``batch_size`` in fast mode (one compiled
    shape). The images, keys and records are the same either way (up to kernel rounding between batch shapes).
    ``timings`` (shared batching): gets a row per model state and sampler group (`generate_parts_to_dir`), with the
    model state's denoiser evaluations when ``evals`` (a callable: the count so far) is given."""
    from erasekit.errors import ErasekitError
    from erasekit.generation import GenerationInputs, generate_parts_to_dir, generate_to_dir, target_key

    by_cell: dict[Cell, list[Job]] = {}
    for job in jobs:
        by_cell.setdefault(job.cell, []).append(job)

    def cell_inputs(cell, group):
        inputs = sources.get(cell)
        if inputs is None:  # preservation / reference / quality prompts: a prompt, a seed and a guidance each
            inputs = GenerationInputs([j.prompt for j in group], [j.seed for j in group],
                                      guidance=[j.guidance for j in group])
        return inputs

    def check(cell, group, records):
        expected = [j.key for j in group[share[0]::share[1]]]
        if [r["key"] for r in records] != expected:  # the jobs and the store must agree on every key
            raise ErasekitError(f"bench cell {cell.id}: image keys of the plan and the store differ")

    made = 0
    if batching == "cell":
        for cell, group in by_cell.items():
            records, generated = generate_to_dir(cell_target(cell, targets, target0), cell_inputs(cell, group),
                                                 out / IMAGES_DIR, steps=group[0].steps, guidance=guidance,
                                                 batch_size=batch_size, progress=progress, fast=fast,
                                                 keyed_names=True, grid=False, share=share)
            check(cell, group, records)
            made += generated
        return made
    # One call per model state: the cells whose targets have one key (the reference and `original` do), unless a
    # defence of it decides per batch (then one call per cell, still padded).
    states: dict[str, list[Cell]] = {}
    for cell in by_cell:
        target = cell_target(cell, targets, target0)
        key = target_key(target, fast)
        states.setdefault(key if shares_batches(target) else f"{key}#{cell.id}", []).append(cell)
    if fast and batch_size != "auto":  # one padded shape for the whole run, the one that pads least
        from erasekit.generation import padded_batch_size
        from erasekit.image_store import read_index

        stored = read_index(out / IMAGES_DIR) if (out / IMAGES_DIR).is_dir() else {}
        batches: dict[tuple, set] = {}  # (state, steps, guidance) -> image keys to make (one sampler batch group)
        for state, members in states.items():
            for c in members:
                for j in by_cell[c][share[0]::share[1]]:
                    if j.key not in stored:
                        batches.setdefault((state, j.steps, j.guidance), set()).add(j.key)
        batch_size = padded_batch_size([len(v) for v in batches.values()], batch_size)
    for members in states.values():
        target = cell_target(members[0], targets, target0)
        parts = [cell_inputs(c, by_cell[c]) for c in members]
        n_rows, n_evals = len(timings) if timings is not None else 0, evals() if evals else 0
        records, generated = generate_parts_to_dir(target, parts, out / IMAGES_DIR,
                                                   steps=[by_cell[c][0].steps for c in members], guidance=guidance,
                                                   batch_size=batch_size, progress=progress, fast=fast,
                                                   keyed_names=True, share=share, pad=bool(fast), timings=timings)
        if timings is not None:
            for row in timings[n_rows:]:
                row["cells"] = [c.id for c in members]
            if evals and len(timings) == n_rows + 1:
                timings[-1]["unet_evals"] = evals() - n_evals
        for c, recs in zip(members, records):
            check(c, by_cell[c], recs)
        made += generated
    return made


# -- scoring ------------------------------------------------------------------------------------------------------
def _load_png(out: Path, key: str) -> np.ndarray:
    from PIL import Image

    with Image.open(out / image_path(key)) as im:
        return np.asarray(im.convert("RGB"))


def score_jobs(pending: list[Job], detectors, det_ids, cfg, world, out: Path, results_path: Path, progress: bool,
               append_jsonl, chunk: int = 256) -> None:
    """Score ``pending`` jobs' images and append one row each to results.jsonl (chunk by chunk)."""
    from erasekit.scoring import score_fields
    from erasekit.validity import image_problem

    label_dets: dict[str, Any] = {}
    bar = progress_bar(len(pending), "scoring", progress)
    for start in range(0, len(pending), chunk):
        part = pending[start : start + chunk]
        images = np.stack([_load_png(out, j.key) for j in part])
        rows = []
        by_concept: dict[str, list[int]] = {}
        for i, j in enumerate(part):
            by_concept.setdefault(j.cell.concept, []).append(i)
        scores: list[dict | None] = [None] * len(part)
        for concept, idx in by_concept.items():
            for i, s in zip(idx, detectors[concept].score(images[idx])):
                scores[i] = s
        label_flags: list[bool | None] = [None] * len(part)
        by_label: dict[str, list[int]] = {}
        for i, j in enumerate(part):
            if j.label:
                by_label.setdefault(j.label, []).append(i)
        for label, idx in by_label.items():
            if label not in label_dets:
                label_dets[label] = label_detector(cfg, world, label)
            det = label_dets[label]
            if det is None:
                continue
            for i, s in zip(idx, det.score(images[idx])):
                label_flags[i] = bool(s["present"])
        for j, s, lf, image in zip(part, scores, label_flags, images):
            rows.append({
                "row": j.row_id, "image": j.key, "path": image_path(j.key), "concept": j.cell.concept,
                "method": j.cell.method, "scenario": j.cell.scenario, "kind": j.cell.kind, "index": j.index,
                "prompt": j.prompt, "seed": j.seed, "steps": j.steps, "guidance": j.guidance, "inputs": j.inputs,
                "target": j.target_id, "label": j.label, "label_present": lf, "labels": s.get("labels"),
                # A degenerate image (NaN latents decode to one flat colour) is flagged, never "concept absent" (#18).
                **score_fields(s, detectors[j.cell.concept].info(), det_ids[j.cell.concept], image_problem(image)),
                **{k: v for k, v in j.extra.items() if k in ("source", "case_number")},
                **({"precision": cfg.precision} if cfg.precision != "default" else {}),  # fp8 products (#23)
            })
        append_jsonl(results_path, rows)
        bar.update(len(part))
    bar.close()


def pending_jobs(jobs: list[Job], done: dict[str, dict], det_ids) -> list[Job]:
    """Jobs without a current row: none yet, another detector's, another image's, or one with no validity."""
    return [j for j in jobs if j.row_id not in done or done[j.row_id].get("detector_id") != det_ids[j.cell.concept]
            or done[j.row_id].get("image") != j.key or "valid" not in done[j.row_id]]


def latest_rows(rows: list[dict], jobs: list[Job]) -> list[dict]:
    """One row per job of this plan (the last line of each wins), in plan order."""
    by_id = {}
    for r in rows:
        by_id[r.get("row")] = r
    return [by_id[j.row_id] for j in jobs if j.row_id in by_id]

