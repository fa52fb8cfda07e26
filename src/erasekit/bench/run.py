"""The benchmark runner: config -> edits -> attack inputs -> images -> scores -> results.jsonl -> summary + report.

The stages (`erasekit.bench.stages`: edits, attacks, generation, scoring; then quality and report), each with a
progress bar and its cost (`erasekit.bench.costs`: wall, CPU, peak memory, images, UNet evaluations), into a
results folder (`erasekit.bench.layout`). Images go through the same loop and store as ``erasekit generate`` and
``erasekit attack`` (`erasekit.generation.generate_to_dir`, `erasekit.image_store`).

A killed run resumes where it stopped: finished edits, tokens, latents, images and rows are reused, never redone.
Several processes (``accelerate launch -m erasekit bench ...``) split every cell's images (process r takes items
r, r + n, ...); the main process computes edits and attack inputs first (the others then read them from the
cache), scores and writes every result. Images carry their own seeds, so results depend on neither the batch size
nor the number of processes.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from erasekit.bench import stages
from erasekit.bench.costs import StageLog, UNetCounter
from erasekit.bench.layout import CACHE_DIR, COSTS_FILE, IMAGES_DIR, RESULTS_FILE, check_out, config_key, write_config
from erasekit.bench.plan import cells
from erasekit.bench.spec import BenchConfig


def _state():
    import torch
    from accelerate import PartialState

    # Without CUDA, processes started by `accelerate launch --multi_gpu` (torchrun) join over gloo on the CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def _load(cfg: BenchConfig, device: str, pipeline=None):
    """The base target: ``pipeline`` when given (already on its device and dtype; ``cfg.model`` names it in the
    records), else ``cfg.model`` loaded."""
    from erasekit.diffusion import Target
    from erasekit.models import fingerprint, load_pipeline
    from erasekit.runtime import resolve_dtype, setup_torch

    setup_torch()
    from erasekit.worlds import world_of

    pipe = pipeline if pipeline is not None else load_pipeline(cfg.model, device=device,
                                                               dtype=resolve_dtype(cfg.dtype, device))
    return Target(pipe, model=cfg.model, world=world_of(pipe), base_fingerprint=fingerprint(pipe))


def _folder_fast(out: Path):
    """The resolved ``fast`` of the config an earlier run saved in ``out`` (None: no such run, or unreadable)."""
    import json

    from erasekit.bench.layout import CONFIG_FILE

    try:
        saved = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))["config"].get("fast", False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return saved if isinstance(saved, bool) else None


@contextmanager
def _nothing():
    yield


def run_bench(cfg: BenchConfig, out, *, progress: bool = True, log=print, pipeline=None) -> dict:
    """Run (or resume) the benchmark into ``out``; returns the summary (main process) or {} (other processes).
    ``pipeline``: an in-memory pipeline to bench instead of loading ``cfg.model`` (scripts/bench_gpu.py --bench)."""
    import dataclasses

    import torch

    from erasekit.folder_lock import hold_folder
    from erasekit.image_store import read_index
    from erasekit.jsonl import append_jsonl, read_jsonl
    from erasekit.runtime import resolve_device
    from erasekit.scoring import detector_id
    from erasekit.threads import apply, available_cores

    from erasekit.bench.plan import resolve_fast
    from erasekit.bench.spec import fast_value

    out = Path(out)
    state = _state()
    main = state.is_main_process
    device = str(state.device) if state.num_processes > 1 else resolve_device(cfg.device)
    fast_choice = None
    earlier = _folder_fast(out) if cfg.fast == "auto" else None
    if earlier is not None:  # a folder resumes as it ran (its keys say fast or eager), whatever the rule says now
        cfg = dataclasses.replace(cfg, fast=earlier)
        fast_choice = {"setting": "auto", "chosen": earlier, "why": "as the folder's earlier runs"}
    elif cfg.fast == "auto" and torch.device(device).type != "cuda":
        cfg, fast_choice = resolve_fast(cfg, device, 0, 0.0)  # eager: known before the model is
    if cfg.fast != "auto":
        check_out(out, cfg)  # every process: fail before the model is loaded (checked again under the lock)
    # Edits, learned tokens and inverted latents are computed by the main process with every core, as a single
    # process computes them (their float bits depend on the thread count); image generation splits the cores.
    on_cpu = state.device.type == "cpu"
    full_threads = apply()["threads"] if state.num_processes == 1 else available_cores()
    if on_cpu:
        torch.set_num_threads(full_threads)
    target0 = _load(cfg, device, pipeline)
    world = target0.world
    if fast_choice is None:  # the rule counts UNet rows: the world's sampler defaults fill the config's gaps
        steps0, guidance0 = world.sampler_defaults()
        cfg, fast_choice = resolve_fast(cfg, device, int(cfg.sampler.steps or steps0),
                                        float(guidance0 if cfg.sampler.guidance is None else cfg.sampler.guidance))
        check_out(out, cfg)
    if cfg.fast:
        from erasekit.diffusion.speed import use_compile_cache

        use_compile_cache(cfg.compile_cache)  # before anything compiles: a fresh folder reuses earlier kernels
    batching = stages.resolve_batching(cfg.batching, device, cfg.fast)
    if main and fast_choice.get("setting") == "auto" and torch.device(device).type == "cuda":
        log(f"fast: auto chose {fast_choice['why']}")  # the CPU's eager choice goes unsaid (quick output unchanged)
    from erasekit.bench.groups import expand

    entries, groups = expand(cfg, world)  # an entry that erases several concepts: its members, one edit (#24)
    concepts = {c.name: c for c in entries}
    for name in concepts:
        world.check_concept(name)
    detectors = {name: stages.make_detector(cfg, world, name) for name in concepts}  # unknown presets fail here
    for det in detectors.values():
        if getattr(det, "name", "") == "toy":
            det.model  # noqa: B018  (load its weights now: fail before any work)
    attack_settings = stages.attack_settings(cfg)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    counter = UNetCounter(target0.pipe)
    log_stages = StageLog(run_id, counter, sink=(lambda rows: append_jsonl(out / COSTS_FILE, rows)) if main else None)
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

        with log_stages.stage("edits") as cost, state.main_process_first():
            targets, edit_info, computed = stages.make_targets(cfg, target0, world, concepts, groups, out, cache,
                                                               progress and main)
            cost.extra.update(computed=computed, reused=len(edit_info) - computed)

        plan = cells(cfg)
        with log_stages.stage("attacks"), state.main_process_first():
            jobs, sources, cell_info = stages.plan_jobs(cfg, plan, concepts, targets, target0, world, detectors,
                                                        attack_settings, steps, guidance, cache, progress and main)

        # -- generation (every cell split over the processes) ---------------------------------------------------
        unique = {job.key for job in jobs}
        stored = read_index(out / IMAGES_DIR) if (out / IMAGES_DIR).is_dir() else {}
        todo = len(unique - set(stored))
        from erasekit.diffusion.speed import compile_delta, compile_stats

        with log_stages.stage("generation", defer=True, images_planned=len(unique), images_todo=todo,
                              fast=fast_choice, batching=batching) as cost:
            if on_cpu and state.num_processes > 1:
                torch.set_num_threads(max(1, full_threads // state.num_processes))
            compiled_before = compile_stats() if cfg.fast else None
            timings: list[dict] = []
            made = stages.generate_cells(jobs, targets, target0, sources, out, guidance, cfg.batch_size, fast_value(cfg),
                                         share=(state.process_index, state.num_processes), progress=progress and main,
                                         batching=batching, timings=timings,
                                         evals=lambda: counter.n)
            cost.add_images(made)
            if timings:  # where the stage's time went: one row per model state and sampler group
                cost.extra["groups"] = timings
            if compiled_before is not None:  # this run's compilation (seconds, graphs, disk-cache hits)
                cost.extra["compile"] = compile_delta(compiled_before, compile_stats())
            if on_cpu:
                torch.set_num_threads(full_threads)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            gen_rows = gather_object([dict(log_stages.rows[-1], process=state.process_index)])
        else:
            gen_rows = [dict(log_stages.rows[-1], process=0)]
        state.wait_for_everyone()
        counter.close()
        if not main:
            return {}
        append_jsonl(out / COSTS_FILE, [{**gen_rows[0], "processes": gen_rows,
                                         "images": sum(r.get("images", 0) for r in gen_rows)}])

        # -- scoring (main process) --------------------------------------------------------------------------------
        results_path = out / RESULTS_FILE
        done = {r.get("row"): r for r in read_jsonl(results_path)}
        det_ids = {name: detector_id(d.info()) for name, d in detectors.items()}
        pending = stages.pending_jobs(jobs, done, det_ids)
        with log_stages.stage("scoring", rows_scored=len(pending), rows_reused=len(jobs) - len(pending)):
            stages.score_jobs(pending, detectors, det_ids, cfg, world, out, results_path, progress, append_jsonl)
        rows = stages.latest_rows(read_jsonl(results_path), jobs)
        with log_stages.stage("quality"):
            from erasekit.bench.quality import compute_quality

            compute_quality(cfg, world.name, rows, out)
        with log_stages.stage("report"):
            from erasekit.bench.results import build_summary, write_outputs

            summary = build_summary(cfg, rows, read_jsonl(out / COSTS_FILE), cell_info, edit_info,
                                    config_key(cfg), run_id, state.num_processes, out)
            write_outputs(out, summary, rows)
        return summary
