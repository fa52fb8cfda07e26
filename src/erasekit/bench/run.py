"""The benchmark runner: config -> edits -> attack inputs -> images -> scores -> results.jsonl -> summary + report.

Stages (each with a progress bar and its cost: wall, CPU, peak memory, images, UNet evaluations):

    edits        each (concept, method) weight edit, cached by method + words + preserve + resolved settings + base
                 fingerprint under ``cache/edits/``
    attacks      each cell's attack inputs (learned tokens, inverted latents: cached by content under ``cache/``)
    generation   every image job not yet on disk, batched, one seed per image, written as
                 ``images/<k[:2]>/<key>.png`` (atomically; the key hashes everything that determines the image)
    scoring      the detector on every image without a row in ``results.jsonl`` (one row per cell image, appended)
    report       tables (CRR with Wilson intervals, preservation, Fréchet distance, costs), summary.json, report

A killed run resumes where it stopped: finished edits, tokens, latents, images and rows are reused, never redone.
Several processes (``accelerate launch -m erasekit bench ...``) split the image jobs
(``PartialState().split_between_processes``); the main process computes edits and attack inputs first (the others
then read them from the cache), scores and writes every result. Images carry their own seeds, so results depend on
neither the batch size nor the number of processes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.bench.plan import PRESERVATION, REFERENCE, Cell, Job, attack_jobs, cells, preservation_jobs
from erasekit.bench.spec import BenchConfig, to_dict
from erasekit.errors import ErasekitError
from erasekit.store import content_key

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
COSTS_FILE = "costs.jsonl"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
CACHE_DIR = "cache"


def image_path(key: str) -> str:
    """Where an image lives, relative to the results folder."""
    return f"{IMAGES_DIR}/{key[:2]}/{key}.png"


def config_key(cfg: BenchConfig) -> str:
    return content_key("bench-config", cfg.identity())


# -- the output folder ----------------------------------------------------------------------------------------
def check_out(out: Path, cfg: BenchConfig) -> bool:
    """Whether ``out`` already holds this config's results (resume); ErasekitError when it cannot take them."""
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return False
    meta = out / CONFIG_FILE
    if not meta.is_file():
        visible = [p for p in out.iterdir() if not p.name.startswith(".")]
        if visible:
            raise ErasekitError(f"--out {out} is not empty and holds no bench results ({CONFIG_FILE}); use a new folder")
        return False
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
        saved_key = saved["config_key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ErasekitError(f"--out {out}: {meta} is unreadable; use a new folder") from None
    if saved_key != config_key(cfg):
        raise ErasekitError(f"--out {out} holds results of another bench config (key {saved_key}, this one "
                            f"{config_key(cfg)}); use a new folder, or the config saved in {meta}")
    return True


def write_config(out: Path, cfg: BenchConfig) -> None:
    from erasekit.atomic import atomic_write_text
    from erasekit.provenance import provenance

    meta = out / CONFIG_FILE
    if meta.is_file():
        return  # check_out, under the same lock, found this config's key in it
    record = {"config_key": config_key(cfg), "config": to_dict(cfg), "provenance": provenance()}
    atomic_write_text(meta, json.dumps(record, indent=2) + "\n")


# -- costs -----------------------------------------------------------------------------------------------------
class UNetCounter:
    """Counts UNet evaluations (batch items through ``pipe.unet``; a CFG pass counts its two halves)."""

    def __init__(self, pipe):
        self.n = 0
        self._handle = pipe.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self.n += int(sample.shape[0])

    def close(self):
        self._handle.remove()


@dataclass
class StageLog:
    run_id: str
    counter: UNetCounter | None = None
    rows: list[dict] = field(default_factory=list)
    sink: Any = None  # called with each finished stage's row (the main process appends it to costs.jsonl)

    @contextmanager
    def stage(self, name: str, defer: bool = False, **extra):
        from erasekit.metrics import measure_cost

        before = self.counter.n if self.counter else 0
        with measure_cost() as cost:
            yield cost
        row = {"run": self.run_id, "stage": name, **cost.as_dict(), **extra}
        row["unet_evals"] = (self.counter.n if self.counter else 0) - before
        self.rows.append(row)
        if self.sink is not None and not defer:
            self.sink([row])  # written as each stage ends: a killed run keeps the cost of what it finished


# -- the run ------------------------------------------------------------------------------------------------------
def _state():
    import torch
    from accelerate import PartialState

    # Without CUDA, processes started by `accelerate launch --multi_gpu` (torchrun) join over gloo on the CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def _bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0, dynamic_ncols=True)


def _load(cfg: BenchConfig, device: str):
    from erasekit.cli.common import resolve_dtype, setup_torch
    from erasekit.diffusion import Target
    from erasekit.models import fingerprint, load_pipeline

    setup_torch()
    pipe = load_pipeline(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    return Target(pipe, model=cfg.model, base_fingerprint=fingerprint(pipe))


def _detector(cfg: BenchConfig, world, concept: str):
    from erasekit.detectors import create_detector

    from erasekit.detectors import parse_spec

    spec = cfg.detector.spec() or world.default_detector(concept)
    settings = dict(cfg.detector.settings)
    if getattr(parse_spec(spec)[0], "spec_settings", False) and cfg.device != "auto":
        settings.setdefault("device", cfg.device)  # a judge scores on the device that generates
    return create_detector(spec, concept=concept, threshold=cfg.detector.threshold, **settings)


def _label_detector(cfg: BenchConfig, world, label: str | None):
    """A detector for a preservation prompt's label, when the detector takes a concept; else None."""
    from erasekit.registry import DETECTORS

    if not label:
        return None
    spec = cfg.detector.spec() or world.default_detector(label)
    cls, preset = DETECTORS.split(spec)
    if not getattr(cls, "needs_concept", False) or preset is not None:
        return None
    return _detector(cfg, world, label)


def _words(value, world, concept: str) -> list[str]:
    if isinstance(value, list):
        return list(value)
    return world.concept_words(concept) if value == "synonyms" else [concept]


def _preserve(value, world, concept: str, method: str = "") -> list[str]:
    if isinstance(value, list):
        return list(value)
    if value == "world":  # what the world's tuned settings for the method assume, as `erasekit erase` does
        return world.method_preserve(method, [concept])
    return world.other_labels(concept) if value == "others" else []


def edit_key(method: str, words, preserve, resolved: dict, base_fingerprint: str) -> str:
    return content_key("edit", method, list(words), list(preserve), resolved, base_fingerprint)


def get_edit(target, method: str, words, preserve, settings: dict, cache: Path, progress: bool):
    """(edit, computed?) from ``cache/edits`` or computed and saved there."""
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


def _defences(mcfg, concept: str) -> list:
    from erasekit.registry import DEFENCES

    out = []
    for d in mcfg.defences:
        cls = DEFENCES.get(d.name)
        out.append(cls.from_overrides(defence_settings(cls, d.settings, concept)))
    return out


def defence_settings(cls, settings: dict, concept: str) -> dict:
    """A defence's settings for one concept: "{concept}" in a text replaced, "concept" filled in when it has one."""
    out = {k: v.replace("{concept}", concept) if isinstance(v, str) else v for k, v in settings.items()}
    if "concept" in cls.Settings.keys() and "concept" not in out:
        out["concept"] = concept
    return out


def _attack_settings(cfg: BenchConfig) -> dict[str, dict]:
    from erasekit.attacks.scenarios import split_settings

    return split_settings({f"{a}.{k}": v for a, values in cfg.attacks.items() for k, v in (values or {}).items()})


def run_bench(cfg: BenchConfig, out, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) the benchmark into ``out``; returns the summary (main process) or {} (other processes)."""
    import torch

    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.scenarios import attack_of
    from erasekit.folder_lock import hold_folder
    from erasekit.jsonl import append_jsonl, read_jsonl

    out = Path(out)
    state = _state()
    main = state.is_main_process
    check_out(out, cfg)  # every process: fail before the model is loaded (checked again under the lock)
    # Edits, learned tokens and inverted latents are computed by the main process with every core, as a single
    # process computes them (their float bits depend on the thread count); image generation splits the cores.
    on_cpu = state.device.type == "cpu"
    from erasekit.threads import apply, available_cores

    full_threads = apply()["threads"] if state.num_processes == 1 else available_cores()
    if on_cpu:
        torch.set_num_threads(full_threads)
    device = str(state.device) if state.num_processes > 1 else _device(cfg.device)
    target0 = _load(cfg, device)
    world = target0.world
    from erasekit.bench.groups import expand

    entries, groups = expand(cfg, world)  # an entry that erases several concepts: its members, one edit (#24)
    concepts = {c.name: c for c in entries}
    for name in concepts:
        world.check_concept(name)
    detectors = {name: _detector(cfg, world, name) for name in concepts}  # unknown presets fail here
    for det in detectors.values():
        if getattr(det, "name", "") == "toy":
            det.model  # noqa: B018  (load its weights now: fail before any work)
    attack_settings = _attack_settings(cfg)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    counter = UNetCounter(target0.pipe)
    stages = StageLog(run_id, counter, sink=(lambda rows: append_jsonl(out / COSTS_FILE, rows)) if main else None)
    cache = out / CACHE_DIR
    lock = hold_folder(out) if main else _nothing()
    with lock:
        if main:
            # Under the lock: another run may have taken the folder since the check above (#18: two configs in one
            # folder), so check again and write the config before releasing anything.
            resuming = check_out(out, cfg)
            write_config(out, cfg)
            if resuming:
                log(f"resuming {out}")
        state.wait_for_everyone()
        if not main:
            check_out(out, cfg)  # the main process's config is there now: it must be this one
        steps0, guidance0 = world.sampler_defaults()
        steps = int(cfg.sampler.steps or steps0)
        guidance = float(guidance0 if cfg.sampler.guidance is None else cfg.sampler.guidance)

        # -- edits -------------------------------------------------------------------------------------------
        targets: dict[tuple[str, str], Any] = {}
        edit_info: dict[tuple[str, str], dict] = {}
        pairs = [(c, m) for c in concepts for m in cfg.methods]
        with stages.stage("edits") as cost, state.main_process_first():
            bar = _bar(len(pairs), "edits", progress and main, unit="edit")
            computed = 0
            for concept, m in pairs:
                edit = None
                if m.edit_name() != "original":
                    words = _words(m.words, world, concept)
                    preserve = _preserve(m.preserve, world, concept, m.edit_name())
                    if concept in groups:  # the group's one edit (the same key for every member: computed once)
                        words, preserve = groups[concept].words_and_preserve(m, world)
                    edit, fresh, folder = get_edit(target0, m.edit_name(), words, preserve, m.settings, cache,
                                                   progress and main)
                    computed += fresh
                    edit_info[(concept, m.name)] = {
                        "method": edit.method, "digest": edit.digest(), "words": words, "preserve": preserve,
                        "settings": edit.settings, "timings": edit.timings, "computed_this_run": fresh,
                        "folder": str(folder.relative_to(out))}
                t = target0.original().with_edits(edit).with_defences(*_defences(m, concept))
                targets[(concept, m.name)] = t
                bar.update(1)
            bar.close()
            cost.extra.update(computed=computed, reused=len(edit_info) - computed)

        # -- attack inputs and jobs -----------------------------------------------------------------------------
        plan = cells(cfg)
        from erasekit.bench.quality import prompt_rows

        quality_rows = prompt_rows(cfg)
        jobs: list[Job] = []
        sources: dict[Cell, Any] = {}  # cell -> AttackInputs (latents / learned vectors for generation)
        cell_info: dict[str, dict] = {}
        with stages.stage("attacks") as cost, state.main_process_first():
            attack_cells = [c for c in plan if c.kind == "attack"]
            bar = _bar(len(attack_cells), "attacks", progress and main, unit="cell")
            for cell in plan:
                ccfg = concepts[cell.concept]
                if cell.kind != "attack":
                    target = targets[(cell.concept, cell.method)] if cell.kind == PRESERVATION else target0.original()
                    pp = ([(p.label, p.prompt) for p in ccfg.preserve_prompts] if ccfg.preserve_prompts is not None
                          else world.preservation_prompts(cell.concept))
                    if quality_rows is not None:  # quality.prompts: a COCO-captions CSV, each row with its seed
                        from erasekit.bench.quality import csv_jobs

                        jobs += csv_jobs(cell, quality_rows, cfg.preservation.images or len(quality_rows), cfg.seed,
                                         steps, guidance, image_target_id(target, cfg))
                        cell_info[cell.id] = {"target": target.describe(), "prompts": cfg.quality.prompts}
                        continue
                    if not pp:
                        cell_info[cell.id] = {"skipped": "no preservation prompts for this concept"}
                        continue
                    jobs += preservation_jobs(cell, pp, cfg.preservation_images(), cfg.seed, steps, guidance,
                                              image_target_id(target, cfg))
                    cell_info[cell.id] = {"target": target.describe()}
                    continue
                target = targets[(cell.concept, cell.method)]
                cls, args = attack_of(cell.scenario)
                overrides = dict(attack_settings.get(cls.name, {}))
                if cls.name == "text" and ccfg.target_prompts and "prompts" not in overrides:
                    overrides["prompts"] = ";".join(ccfg.target_prompts)
                attack = cls.from_overrides(overrides)
                csv_ok = ccfg.prompts_csv and cls.name in ("text", "unlearndiffatk")  # the rows' prompts and seeds
                ctx = AttackContext(target=target, concept=cell.concept, n=cfg.images_per_cell, seed=cfg.seed,
                                    steps=cfg.sampler.steps, batch_size=cfg.attack_batch_size,
                                    images_folder=Path(ccfg.images) if ccfg.images else None,
                                    prompts_csv=Path(ccfg.prompts_csv) if csv_ok else None,
                                    detector=detectors[cell.concept],  # attacks that check success in their loop
                                    cache_dir=cache, progress=progress and main)
                from erasekit.metrics import measure_cost

                with measure_cost() as acost:
                    inputs = attack.inputs(ctx, **args)
                gen_steps = int(inputs.budget.get("inversion_steps", steps)) if inputs.latents is not None else steps
                sources[cell] = inputs
                jobs += attack_jobs(cell, inputs, gen_steps, guidance, image_target_id(target, cfg))
                cell_info[cell.id] = {"target": target.describe(), "attack": inputs.attack,
                                      "attack_settings": attack.settings.to_dict(),
                                      "budget": {k: v for k, v in inputs.budget.items()},
                                      "this_run": acost.as_dict(), "notes": list(ctx.notes)}
                bar.update(1)
            bar.close()

        # -- generation (split over processes) ----------------------------------------------------------------------
        unique: dict[str, Job] = {}
        for job in jobs:
            unique.setdefault(job.key, job)
        todo = [j for k, j in unique.items() if not (out / image_path(k)).is_file()]
        with stages.stage("generation", defer=True, images_planned=len(unique), images_todo=len(todo)) as cost:
            if on_cpu and state.num_processes > 1:
                torch.set_num_threads(max(1, full_threads // state.num_processes))
            with state.split_between_processes(todo) as mine:
                made = _generate(mine, targets, target0, sources, out, cfg.batch_size,
                                 progress and main, state.num_processes, cfg.fast)
            cost.add_images(made)
            if on_cpu:
                torch.set_num_threads(full_threads)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            gen_rows = gather_object([dict(stages.rows[-1], process=state.process_index)])
        else:
            gen_rows = [dict(stages.rows[-1], process=0)]
        state.wait_for_everyone()
        counter.close()
        if not main:
            return {}
        append_jsonl(out / COSTS_FILE, [{**gen_rows[0], "processes": gen_rows,
                                         "images": sum(r.get("images", 0) for r in gen_rows)}])

        # -- scoring (main process) --------------------------------------------------------------------------------
        results_path = out / RESULTS_FILE
        done = {r.get("row"): r for r in read_jsonl(results_path)}
        det_ids = {name: content_key(d.info()) for name, d in detectors.items()}
        pending = [j for j in jobs if j.row_id not in done or done[j.row_id].get("detector_id") != det_ids[j.cell.concept]
                   or done[j.row_id].get("image") != j.key or "valid" not in done[j.row_id]]
        with stages.stage("scoring", rows_scored=len(pending), rows_reused=len(jobs) - len(pending)):
            _score(pending, detectors, det_ids, cfg, world, out, results_path, progress, append_jsonl)
        rows = _latest_rows(read_jsonl(results_path), jobs)
        with stages.stage("quality"):
            from erasekit.bench.quality import compute_quality

            compute_quality(cfg, world.name, rows, out)
        with stages.stage("report"):
            from erasekit.bench.results import build_summary, write_outputs

            summary = build_summary(cfg, rows, read_jsonl(out / COSTS_FILE), cell_info, edit_info,
                                    config_key(cfg), run_id, state.num_processes, out)
            write_outputs(out, summary, rows)
        return summary


@contextmanager
def _nothing():
    yield


def _device(name: str) -> str:
    from erasekit.cli.common import resolve_device

    return resolve_device(name)


def image_target_id(target, cfg) -> str:
    """What a job's image key knows of the model: the target's cache id, marked when generated in fast mode."""
    return target.cache_id + ("+fast" if cfg.fast else "")


def _generate(jobs: list[Job], targets, target0, sources, out: Path, batch_size: int, progress: bool,
              n_processes: int, fast: bool) -> int:
    """Generate ``jobs`` (this process's share) into ``out/images``, batch by batch, per cell."""
    from collections import defaultdict

    from PIL import Image

    from erasekit.atomic import atomic_write
    from erasekit.generation import generate

    by_cell: dict[Cell, list[Job]] = defaultdict(list)
    for job in jobs:
        by_cell[job.cell].append(job)
    bar = _bar(len(jobs), f"generating ({n_processes} processes)" if n_processes > 1 else "generating", progress)
    made = 0
    for cell, group in by_cell.items():
        target = target0.original() if cell.kind == REFERENCE else targets[(cell.concept, cell.method)]
        inputs = sources.get(cell)
        for guidance in sorted({j.guidance for j in group}):
            same = [j for j in group if j.guidance == guidance]
            for start in range(0, len(same), batch_size):
                batch = same[start : start + batch_size]
                kwargs: dict[str, Any] = {}
                prompts = [j.prompt for j in batch]
                if inputs is not None and inputs.latents is not None:
                    kwargs["latents"] = inputs.latents[[j.index for j in batch]]
                if inputs is not None and inputs.learned is not None:
                    with target.active():
                        kwargs["prompt_embeds"] = inputs.learned.encode(target.pipe, prompts)
                    prompts = None
                images = generate(target, prompts, [j.seed for j in batch], steps=batch[0].steps, guidance=guidance,
                                  batch_size=batch_size, progress=False, fast=fast, **kwargs)
                for job, image in zip(batch, images):
                    path = out / image_path(job.key)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
                made += len(batch)
                bar.update(len(batch))
    bar.close()
    return made


def _load_png(out: Path, key: str) -> np.ndarray:
    from PIL import Image

    with Image.open(out / image_path(key)) as im:
        return np.asarray(im.convert("RGB"))


def _score(pending: list[Job], detectors, det_ids, cfg, world, out: Path, results_path: Path, progress: bool,
           append_jsonl, chunk: int = 256) -> None:
    """Score ``pending`` jobs' images and append one row each to results.jsonl (chunk by chunk)."""
    from erasekit.validity import image_problem, validity_fields

    label_dets: dict[str, Any] = {}
    bar = _bar(len(pending), "scoring", progress)
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
                label_dets[label] = _label_detector(cfg, world, label)
            det = label_dets[label]
            if det is None:
                continue
            for i, s in zip(idx, det.score(images[idx])):
                label_flags[i] = bool(s["present"])
        for j, s, lf, image in zip(part, scores, label_flags, images):
            info = detectors[j.cell.concept].info()
            rows.append({
                "row": j.row_id, "image": j.key, "path": image_path(j.key), "concept": j.cell.concept,
                "method": j.cell.method, "scenario": j.cell.scenario, "kind": j.cell.kind, "index": j.index,
                "prompt": j.prompt, "seed": j.seed, "steps": j.steps, "guidance": j.guidance, "inputs": j.inputs,
                "target": j.target_id, "label": j.label, "label_present": lf, "score": s["score"],
                "present": bool(s["present"]), "labels": s.get("labels"), "detector": info["name"],
                "preset": info.get("preset"), "threshold": info["threshold"], "detector_id": det_ids[j.cell.concept],
                **({"judge_model": info["model"], "judge_fingerprint": info["model_fingerprint"],
                    "judge_settings": info.get("settings")} if "model_fingerprint" in info else {}),
                **{k: v for k, v in j.extra.items() if k in ("source", "case_number")},
                # A degenerate image (NaN latents decode to one flat colour) is flagged, never "concept absent" (#18).
                **validity_fields(image_problem(image)),
            })
        append_jsonl(results_path, rows)
        bar.update(len(part))
    bar.close()


def _latest_rows(rows: list[dict], jobs: list[Job]) -> list[dict]:
    """One row per job of this plan (the last line of each wins), in plan order."""
    by_id = {}
    for r in rows:
        by_id[r.get("row")] = r
    return [by_id[j.row_id] for j in jobs if j.row_id in by_id]
