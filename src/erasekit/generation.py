"""Generation through a `Target`, batched, one seed per image, resumable into a folder.

Every image has its own seed: its initial latents and any later sampler noise come from its own
``torch.Generator("cpu").manual_seed(seed)``, so its noise does not depend on the batch it is generated in, on the
batch size or on the device. (Pixels can: on CPU, batched kernels may differ in the last float bit between batch
sizes, and after rounding to uint8 an image then differs from its single-image self by at most 1 level at a few
pixels, which the tests allow; GPU and CPU kernels differ more.)

`generate` returns images; `generate_to_dir` is the one resumable loop that writes them into a store
(`erasekit.image_store`): ``erasekit generate``, every attack scenario (`erasekit.attacks.scenarios.run_scenario`)
and every bench cell generate through it. An image's record (`image_records`) holds everything that determines it;
its key (`erasekit.image_store.record_key`) hashes those fields, the target through `target_key`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from erasekit.diffusion.sampler import seed_generators
from erasekit.diffusion.vae import image_size

__all__ = ["GenerationInputs", "generate", "generate_to_dir", "image_records", "target_fields", "target_key",
           "default_settings", "initial_latents", "image_size", "seed_generators", "tensor_digest"]


def default_settings(pipe) -> tuple[int, float]:
    """(DDIM steps, guidance scale) when the caller gives none: the model's world's."""
    from erasekit.diffusion.target import as_target

    return as_target(pipe).world.sampler_defaults()


def initial_latents(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Float32 CPU standard-normal latents (N, C, h, w), one draw per seed (unscaled by init_noise_sigma)."""
    from erasekit.diffusion.sampler import Sampler

    height, width = image_size(pipe, height, width)
    return Sampler(pipe, 1).draw_noise(seed_generators(seeds), height, width)


def tensor_digest(t: torch.Tensor, n_chars: int = 16) -> str:
    t = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:n_chars]


@dataclass
class GenerationInputs:
    """One generation per item: a prompt and a seed, optionally a guidance scale, initial latents (N, C, h, w) or a
    learned embedding (whose token the prompts use), and fields recorded with the image (``items``)."""

    prompts: list[str]
    seeds: list[int]
    guidance: list[float | None] | None = None
    latents: torch.Tensor | None = None
    learned: Any = None
    items: list[dict] = field(default_factory=list)
    # Optional: replaces the standard sampling (probes: two-model sampling, inpainting, classifier guidance).
    # ``generate(target, indices, steps=, guidance=, batch_size=)`` -> uint8 images of those items; its ``keys``
    # (one string per item: everything it adds that changes pixels) enter each image's key through ``inputs``.
    generate: Any = None

    def __post_init__(self):
        n = len(self.prompts)
        self.seeds = [int(s) for s in self.seeds]
        for what, value in (("seeds", self.seeds), ("guidance values", self.guidance), ("latents", self.latents)):
            if value is not None and len(value) != n:
                raise ValueError(f"{n} prompts but {len(value)} {what}")
        if not self.items:
            self.items = [{} for _ in range(n)]
        if len(self.items) != n:
            raise ValueError(f"{n} prompts but {len(self.items)} item records")

    def __len__(self) -> int:
        return len(self.prompts)

    def input_ids(self) -> list[str | None]:
        """Per image, a hash of the inputs other than prompt and seed (latents, learned vectors): part of its key."""
        learned = f"ti:{self.learned.digest()}" if self.learned is not None else None
        ids: list[str | None] = []
        for i in range(len(self)):
            parts = [learned] if learned else []
            if self.latents is not None:
                parts.append(f"latent:{tensor_digest(self.latents[i])}")
            if self.generate is not None:
                parts.append(f"gen:{self.generate.keys[i]}")
            ids.append("+".join(parts) or None)
        return ids


def _per_item(value, n: int, what: str) -> list | None:
    """Broadcast a str / None to n items, or check a list has n items."""
    if value is None or isinstance(value, str):
        return None if value is None else [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what}: expected {n} items, got {len(value)}")
    return value


def build_guidance(target, sampler, prompts, embeds, negatives, scale: float, seeds, size=None, unet=None,
                   cond=None):
    """(guidance, defence hooks) for one batch: the family's conditioning (``embeds`` replace ``prompts``; a ready
    ``cond`` replaces both, ``prompts`` then only inform the defences), the
    unconditional branch when ``scale > 1`` (the negatives, or the family's empty prompt: zeros on SDXL-base),
    classifier-free guidance over ``unet`` (default the pipeline's), then every defence's wrapper and hooks.
    ``size``: the image size SDXL's time ids name (default the pipeline's)."""
    from erasekit.diffusion.context import SamplingContext
    from erasekit.diffusion.guidance import UNetDenoiser, guided

    pipe, family = target.pipe, target.family
    device = family.denoiser(pipe).device
    if cond is None:
        cond = (family.from_states(pipe, embeds, size=size) if embeds is not None
                else family.encode(pipe, prompts, device=device, size=size))
    wants = getattr(family, "needs_uncond", None)  # FLUX.1's true CFG needs it whatever the distilled scale
    uncond = (family.unconditional(pipe, negatives, device=device, size=size)
              if scale > 1.0 or (wants is not None and wants(pipe, scale)) else None)
    ctx = SamplingContext(target, sampler, prompts, cond, uncond, scale, seeds)
    guidance = guided(UNetDenoiser(unet if unet is not None else family.denoiser(pipe), family), cond, uncond, scale)
    hooks: list = []
    for defence in target.defences:
        guidance = defence.wrap(guidance, ctx)
        hooks.extend(defence.hooks(ctx))
    return guidance, hooks


def _sample_batch(target, sampler, prompts, embeds, negatives, noise, latents_given, generators, guidance_scale,
                  seeds, finite: list | None = None, cond=None):
    """One batch through the sampler, with the target's defences installed around it. ``finite``: one bool per
    image is appended, whether its final latents are finite."""
    from erasekit.diffusion.speed import decode_batch, unet_for

    pipe = target.pipe
    z = latents_given if latents_given is not None else noise
    size = (z.shape[-2] * pipe.vae_scale_factor, z.shape[-1] * pipe.vae_scale_factor)  # SDXL's time ids
    guidance, hooks = build_guidance(target, sampler, prompts, embeds, negatives, guidance_scale, seeds, size=size,
                                     unet=unet_for(pipe), cond=cond)
    z = sampler.prepare_latents(z)
    z = sampler.denoise(z, guidance, hooks, generators=generators)
    from erasekit.diffusion.vae import decode_latents

    if finite is not None:
        finite.extend(torch.isfinite(z).flatten(1).all(1).tolist())
    return decode_latents(pipe, z, decode_batch(pipe))


def resolve_batch_size(target, batch_size: int | str, guidance: float | None = None, height: int | None = None,
                       width: int | None = None) -> int:
    """``batch_size`` itself, or for ``"auto"`` as many images as the free GPU memory holds (32 on the CPU)."""
    if batch_size == "auto":
        from erasekit.diffusion.speed import auto_batch_size

        h, w = image_size(target.pipe, height, width)
        return auto_batch_size(target.pipe, target.family, h, w, float(guidance if guidance is not None else
                                                        target.world.sampler_defaults()[1]))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}")
    return batch_size


def generate(
    target,
    prompts: str | Sequence[str] | None,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int | str = 32,
    negative_prompt: str | Sequence[str] | None = None,
    latents: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    progress: bool = True,
    fast: bool | str = False,
    problems: list | None = None,
    true_cfg: float | None = None,
) -> np.ndarray:
    """Generate one image per seed with ``target`` (a `Target` or a bare pipeline); returns uint8 (N, H, W, 3).

    ``prompts``: one per seed, or one string for all (None when ``prompt_embeds`` (N, T, D) is given).
    ``latents``: (N, C, h, w) initial latents replacing the seeded draw (e.g. from DDIM inversion); the seeds
    then only drive sampler noise (``eta > 0``). ``steps``/``guidance`` default to the model's world's.
    ``fast``: channels-last + compiled UNet (`erasekit.diffusion.speed`; images equal the eager path's up to
    kernel rounding); ``fast="fp8"``: fast, with FP8 products in the UNet's linear layers (`erasekit.diffusion.fp8`:
    CUDA 8.9+; other images, keyed apart); ``batch_size="auto"``: as many images per batch as free GPU memory holds.
    ``problems``: when given, one entry per image is appended: None, or why the image is degenerate (non-finite
    latents, a constant image; `erasekit.validity`).
    ``true_cfg``: FLUX.1's true classifier-free guidance at this scale, ``negative_prompt`` (or the empty prompt) its
    unconditional branch (`Target.with_true_cfg`; None: the target's own, off unless set; other families refuse it).
    """
    from tqdm.auto import tqdm

    from erasekit.diffusion.sampler import Sampler
    from erasekit.diffusion.target import as_target

    target = as_target(target)
    if true_cfg is not None:
        target = target.with_true_cfg(true_cfg)
    pipe = target.pipe
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if fast:
        from erasekit.diffusion.fp8 import precision_of
        from erasekit.diffusion.speed import accelerate

        accelerate(pipe, precision=precision_of(fast))
    batch_size = resolve_batch_size(target, batch_size, guidance, height, width)
    if prompt_embeds is None and prompts is None:
        raise ValueError("give prompts or prompt_embeds")
    prompts = _per_item(prompts, n, "prompts")
    negatives = _per_item(negative_prompt, n, "negative_prompt")
    if prompt_embeds is not None and len(prompt_embeds) != n:
        raise ValueError(f"prompt_embeds: expected {n} items, got {len(prompt_embeds)}")
    if latents is not None and len(latents) != n:
        raise ValueError(f"latents: expected {n} items, got {len(latents)}")
    default_steps, default_guidance = target.world.sampler_defaults()
    sampler = Sampler(pipe, int(steps or default_steps), eta)
    scale = float(default_guidance if guidance is None else guidance)
    height, width = image_size(pipe, height, width)

    out = np.empty((n, height, width, 3), np.uint8)
    finite: list[bool] = []
    starts = range(0, n, batch_size)
    with torch.inference_mode(), target.active():
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2, leave=False):
            sl = slice(start, start + batch_size)
            generators = seed_generators(seeds[sl])
            # Drawn from the image's own generator, which then also supplies its sampler noise.
            noise = sampler.draw_noise(generators, height, width) if latents is None else None
            out[sl] = _sample_batch(
                target, sampler, prompts[sl] if prompts is not None else None,
                prompt_embeds[sl] if prompt_embeds is not None else None,
                negatives[sl] if negatives is not None else None, noise,
                latents[sl] if latents is not None else None, generators, scale, seeds[sl], finite)
    if problems is not None:
        from erasekit.validity import NON_FINITE_LATENTS, image_problem

        problems.extend(NON_FINITE_LATENTS if not ok else image_problem(im) for ok, im in zip(finite, out))
    return out


def target_key(target, fast: bool | str = False) -> str:
    """What an image's key knows of the model: the target's cache id (base fingerprint, edit digests, defence
    records), marked when generated in fast mode (compiled kernels round differently: such images never stand in
    for eager ones), and with ``fast="fp8"`` (or "fp8-conv") marked "+fp8" ("+fp8-conv") too (FP8 products: other
    images again)."""
    from erasekit.diffusion.fp8 import precision_of

    precision = precision_of(fast)
    return target.cache_id + ("+fast" if precision else "") + (f"+{precision}" if precision not in (None, "default")
                                                               else "")


def target_fields(target, fast: bool = False) -> dict:
    """The fields every image of ``target`` records: what the model is (readable: model, fingerprint, edits,
    defences; keyed: ``target``) and how it samples (scheduler, image size)."""
    who = target.describe()
    height, width = image_size(target.pipe)
    fields = dict(model=who["model"], fingerprint=who["fingerprint"],
                  edit="+".join(who["edits"]) if who["edits"] else None, defences=who["defences"],
                  target=target_key(target, fast), scheduler=target.family.sampling_scheduler_name, height=height,
                  width=width)
    if who.get("true_cfg") is not None:
        fields["true_cfg"] = who["true_cfg"]  # recorded (keyed through ``target``): FLUX.1's true CFG scale
    if fast:
        fields["fast"] = True
        from erasekit.diffusion.fp8 import precision_of

        if precision_of(fast) != "default":
            fields["precision"] = precision_of(fast)  # recorded (keyed through ``target``): FP8 products in the UNet
    return fields


def image_records(target, inputs: GenerationInputs, *, steps: int | None = None, guidance: float | None = None,
                  negative_prompt: str | None = None, eta: float = 0.0, record: dict | None = None,
                  fast: bool = False) -> list[dict]:
    """One record per item of ``inputs``: what `generate_to_dir` writes to the index beside each image (its key
    hashes the fields in `erasekit.image_store.KEY_FIELDS`). ``guidance`` fills the items without their own."""
    default_steps, default_guidance = target.world.sampler_defaults()
    base = dict(record or {}, steps=int(steps or default_steps), eta=float(eta), negative_prompt=negative_prompt,
                **target_fields(target, fast))
    fill = float(default_guidance if guidance is None else guidance)
    input_ids = inputs.input_ids()
    out = []
    for i in range(len(inputs)):
        g = inputs.guidance[i] if inputs.guidance is not None else None
        out.append(dict(inputs.items[i], **base, guidance=fill if g is None else float(g), prompt=inputs.prompts[i],
                        seed=inputs.seeds[i], inputs=input_ids[i]))
    return out


def _wanted_records(target, inputs: GenerationInputs, *, steps, guidance, negative_prompt, eta, record, fast,
                    keyed_names: bool, share: tuple[int, int]) -> tuple[list[dict], range]:
    """(the records of every item of ``inputs``, the items of this process's share): `image_records`, marked
    ``truncated`` where the text encoder sees only a prompt's first tokens (warned once), named by key when
    ``keyed_names``."""
    from erasekit.image_store import keyed_filename, record_key
    from erasekit.models.prompts import truncated_prompts, warn_truncated

    wanted = image_records(target, inputs, steps=steps, guidance=guidance, negative_prompt=negative_prompt, eta=eta,
                           record=record, fast=fast)
    rank, n_shares = share
    mine = range(rank, len(inputs), n_shares)
    distinct = list(dict.fromkeys(inputs.prompts[i] for i in mine))
    cut = dict(zip(distinct, truncated_prompts(target.pipe, distinct))) if inputs.learned is None else {}
    mine_prompts = [inputs.prompts[i] for i in mine]
    warn_truncated(mine_prompts, [cut.get(p, False) for p in mine_prompts], target.pipe.tokenizer.model_max_length)
    for i in mine:
        if cut.get(inputs.prompts[i]):
            wanted[i]["truncated"] = True  # the text encoder saw only the prompt's first tokens
        if keyed_names:
            wanted[i]["path"] = keyed_filename(record_key(wanted[i]))
    return wanted, mine


def generate_to_dir(target, inputs: GenerationInputs, out_dir, *, steps: int | None = None,
                    guidance: float | None = None, batch_size: int | str = 32, negative_prompt: str | None = None,
                    eta: float = 0.0, record: dict | None = None, progress: bool = True, fast: bool = False,
                    keyed_names: bool = False, grid: bool = True, share: tuple[int, int] = (0, 1)
                    ) -> tuple[list[dict], int]:
    """Generate image i of ``inputs`` into the store ``out_dir`` unless it is already there (`erasekit.image_store`).

    ``guidance`` fills the items without their own. ``record``: fields written into every image's record (the
    attack's name). ``fast``/``batch_size="auto"`` as in `generate`; fast images are recorded (and keyed) as such.
    ``keyed_names``: PNGs named by key (`image_store.keyed_filename`, the benchmark's store), not readably.
    ``grid``: write ``grid.png`` of the records. ``share=(rank, n)``: this process takes items rank, rank + n, ...
    (a split fixed by the inputs alone, so processes that resume never miss or repeat an item) and appends to its
    own index (`image_store.index_name`).
    Returns the records (of this process's share) in request order and how many images were generated.
    """
    from tqdm.auto import tqdm

    from erasekit.diffusion.target import as_target
    from erasekit.image_store import index_name, read_index, record_key, save_images, write_grid
    from erasekit.validity import image_problems

    target = as_target(target)
    wanted, mine = _wanted_records(target, inputs, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                                   eta=eta, record=record, fast=fast, keyed_names=keyed_names, share=share)
    rank = share[0]
    fill = float(target.world.sampler_defaults()[1] if guidance is None else guidance)
    batch_size = resolve_batch_size(target, batch_size, fill)
    done = read_index(out_dir)
    todo = [i for i in mine if record_key(wanted[i]) not in done]
    by_guidance: dict[float, list[int]] = defaultdict(list)
    for i in todo:
        by_guidance[wanted[i]["guidance"]].append(i)
    steps = int(steps or target.world.sampler_defaults()[0])
    bar = tqdm(total=len(todo), unit="img", desc="generating", disable=not progress or not todo, leave=False)
    # Generated and saved batch by batch, so that a killed run keeps every finished batch.
    with target.active(), bar:  # the bar is cleared on errors too (a full disk: the error line stands alone)
        for scale, group in by_guidance.items():
            for start in range(0, len(group), batch_size):
                idx = group[start : start + batch_size]
                prompts = [inputs.prompts[i] for i in idx]
                kwargs: dict[str, Any] = {}
                if inputs.latents is not None:
                    kwargs["latents"] = inputs.latents[idx]
                if inputs.learned is not None:
                    kwargs["prompt_embeds"] = inputs.learned.encode(target.pipe, prompts)
                    prompts = None
                problems: list = []
                if inputs.generate is not None:
                    images = inputs.generate(target, idx, steps=steps, guidance=scale, batch_size=batch_size)
                    problems = image_problems(images)
                else:
                    images = generate(target, prompts, [inputs.seeds[i] for i in idx], steps=steps,
                                      guidance=scale, batch_size=batch_size, negative_prompt=negative_prompt, eta=eta,
                                      progress=False, fast=fast, problems=problems, **kwargs)
                # A degenerate image is recorded as such (#18): it must never count as "concept absent".
                batch = [dict(wanted[i], valid=False, invalid=p) if p else wanted[i] for i, p in zip(idx, problems)]
                for rec in save_images(images, out_dir, batch, grid=False, index=index_name(rank)):
                    done[rec["key"]] = rec
                bar.update(len(idx))
    records = [done[record_key(wanted[i])] for i in mine]
    if records and grid:
        write_grid(out_dir, records)
    return records, len(todo)


def generate_parts_to_dir(target, parts: Sequence[GenerationInputs], out_dir, *, steps: Sequence[int | None],
                          guidance: float | None = None, batch_size: int | str = 32, negative_prompt: str | None = None,
                          eta: float = 0.0, record: dict | None = None, progress: bool = True, fast: bool = False,
                          keyed_names: bool = False, share: tuple[int, int] = (0, 1), pad: bool = False,
                          timings: list | None = None) -> tuple[list[list[dict]], int]:
    """`generate_to_dir` for several inputs of one target at once, batched across them: the images of every part
    that share sampling steps and guidance go through the sampler together, ``batch_size`` a batch, each row with
    its own prompt (or learned token), seed and initial latents. Records, keys, files and the resume rule are
    `generate_to_dir`'s; an image two parts share (one key) is generated once. ``steps``: one per part.

    ``pad``: every batch is filled up to ``batch_size`` rows with copies of its last row (generated, then dropped),
    so the text encoder, the UNet (every call, a defence's too) and the decoder see one shape: with ``fast``, one
    compilation for the whole run. Parts with their own ``generate`` (probes) run as in `generate_to_dir`.
    The caller keeps together only parts whose target's defences treat each row on its own (a defence that decides
    for a whole batch, e.g. from whether any prompt names the concept, would see other parts' rows).
    Returns the records of each part (this process's share, request order) and how many images were generated."""
    from tqdm.auto import tqdm

    from erasekit.diffusion.sampler import Sampler
    from erasekit.diffusion.target import as_target
    from erasekit.image_store import index_name, read_index, record_key

    target = as_target(target)
    steps = [int(s or target.world.sampler_defaults()[0]) for s in steps]
    if len(steps) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(steps)} step counts")
    made = 0
    custom = [k for k, p in enumerate(parts) if p.generate is not None]
    records: list[list[dict] | None] = [None] * len(parts)
    for k in custom:
        records[k], n = generate_to_dir(target, parts[k], out_dir, steps=steps[k], guidance=guidance,
                                        batch_size=batch_size, negative_prompt=negative_prompt, eta=eta, record=record,
                                        progress=progress, fast=fast, keyed_names=keyed_names, grid=False, share=share)
        made += n
    if fast:
        from erasekit.diffusion.fp8 import precision_of
        from erasekit.diffusion.speed import accelerate

        accelerate(target.pipe, precision=precision_of(fast))
    fill = float(target.world.sampler_defaults()[1] if guidance is None else guidance)
    batch_size = resolve_batch_size(target, batch_size, fill)
    wanted: dict[int, list[dict]] = {}
    mine: dict[int, range] = {}
    for k, inputs in enumerate(parts):
        if k not in custom:
            wanted[k], mine[k] = _wanted_records(target, inputs, steps=steps[k], guidance=guidance,
                                                 negative_prompt=negative_prompt, eta=eta, record=record, fast=fast,
                                                 keyed_names=keyed_names, share=share)
    done = read_index(out_dir)
    groups: dict[tuple[int, float], list[tuple[int, int]]] = defaultdict(list)  # (steps, scale) -> (part, item)
    seen: set[str] = set()
    for k in wanted:
        for i in mine[k]:
            key = record_key(wanted[k][i])
            if key not in done and key not in seen:
                seen.add(key)
                groups[(steps[k], wanted[k][i]["guidance"])].append((k, i))
    todo = sum(len(g) for g in groups.values())
    height, width = image_size(target.pipe)
    bar = tqdm(total=todo, unit="img", desc="generating", disable=not progress or not todo, leave=False)
    # On a GPU the PNGs are written on worker threads while the next batch samples (a 512x512 PNG takes 0.1-0.2 s
    # of CPU: as long as the GPU takes for its image); on the CPU, in line, as generate_to_dir writes them.
    on_gpu = target.family.denoiser(target.pipe).device.type == "cuda"
    writer = BatchWriter(out_dir, index_name(share[0]), done, workers=min(8, os.cpu_count() or 1) if on_gpu else 0)
    with torch.inference_mode(), target.active(), bar, writer:
        for (n_steps, scale), rows in groups.items():
            group_start = first = time.perf_counter()
            n_batches = 0
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                real = len(batch)
                if pad:
                    batch = batch + [batch[-1]] * (batch_size - real)
                sampler = Sampler(target.pipe, n_steps, eta)
                images, problems = _sample_rows(target, sampler, parts, batch, scale, negative_prompt, height, width)
                recs = [wanted[k][i] for k, i in batch[:real]]
                recs = [dict(r, valid=False, invalid=p) if p else r for r, p in zip(recs, problems[:real])]
                writer.submit(images[:real], recs)
                bar.update(real)
                n_batches += 1
                if n_batches == 1:
                    first = time.perf_counter() - first
            if timings is not None:
                timings.append(dict(target=target_key(target, fast), steps=n_steps, guidance=scale, images=len(rows),
                                    batches=n_batches, batch=batch_size,
                                    images_run=(n_batches * batch_size if pad else len(rows)),
                                    wall_s=round(time.perf_counter() - group_start, 3), first_batch_s=round(first, 3)))
    made += todo
    for k in wanted:
        records[k] = [done[record_key(wanted[k][i])] for i in mine[k]]
    return records, made


class BatchWriter:
    """Batches of images into a store (`erasekit.image_store` layout and rules), PNGs on ``workers`` threads (0: in
    line, `image_store.save_images`) and each batch's index rows appended by the caller's thread once all its PNGs
    are on disk (a crash leaves orphan PNGs, never a row without its image). ``done``: key -> record, filled in as
    rows are written. At most two batches in flight; errors (a full disk) are raised on the next call or at exit."""

    def __init__(self, out_dir, index: str, done: dict, workers: int = 0):
        self.out, self.index, self.done, self.workers = Path(out_dir), index, done, workers
        self.pending: list = []
        self.pool = None
        if workers:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")

    def submit(self, images, records) -> None:
        from erasekit.image_store import image_filename, record_key, save_images

        if self.pool is None:
            for rec in save_images(images, self.out, records, grid=False, index=self.index):
                self.done[rec["key"]] = rec
            return
        recs = []
        for rec in records:
            rec = dict(rec, key=record_key(rec))
            rec.setdefault("path", image_filename(rec))
            recs.append(rec)
        images = np.ascontiguousarray(np.asarray(images, np.uint8))
        self.pending.append(([self.pool.submit(_write_png, im, self.out / r["path"]) for im, r in zip(images, recs)],
                             recs))
        while len(self.pending) > 2:
            self._finish(self.pending.pop(0))

    def _finish(self, item) -> None:
        from erasekit.jsonl import append_jsonl

        futures, recs = item
        for f in futures:
            f.result()  # a worker's error (a full disk) is raised here
        append_jsonl(self.out / self.index, recs)
        for rec in recs:
            self.done[rec["key"]] = rec

    def close(self) -> None:
        try:
            while self.pending:
                self._finish(self.pending.pop(0))
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # keep the batches that finished, then let the first error stand
            try:
                self.close()
            except Exception:
                pass
        return False


def _write_png(image: np.ndarray, path: Path) -> None:
    from erasekit.image_store import _write_png_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png_atomic(image, path)


# A batch costs about this many images' worth of time beyond its images (launches, the decoder's and the text
# encoder's fixed work): fitted to T(B) = t (B + c) / B through the H100 SD-1.4-shape figures 4.41 images/s at
# batch 64 and 4.47 at 128 (c = 1.8). A padding row costs a whole image.
BATCH_OVERHEAD_IMAGES = 1.8


def padded_batch_size(group_sizes: Sequence[int], batch_size: int, smallest: int = 8) -> int:
    """The batch size for padded batches (one compiled shape) of groups this size: ``batch_size`` or a halving of it
    (down to ``smallest``), whichever costs least: rows run (padding included) plus `BATCH_OVERHEAD_IMAGES` a batch.
    (Cells of 32 images, 96 or 160 a model state: batch 64 would pad 18% of the rows, 32 pads none.)"""
    sizes = [int(n) for n in group_sizes if n > 0]
    best, best_cost = batch_size, None
    b = batch_size
    while b >= min(smallest, batch_size) and b >= 1:
        batches = sum(-(-n // b) for n in sizes)
        cost = batches * (b + BATCH_OVERHEAD_IMAGES)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = b, cost
        if b % 2:
            break
        b //= 2
    return best


def _sample_rows(target, sampler, parts, rows, scale: float, negative_prompt, height: int, width: int):
    """One batch of (part, item) rows: (uint8 images, one problem or None per row). Each row's start is its part's
    latents or its seed's draw; its conditioning its prompt's, through its part's learned token if any (rows of
    one source encoded together, in row order)."""
    from erasekit.diffusion.speed import decode_batch, unet_for
    from erasekit.diffusion.vae import decode_latents
    from erasekit.validity import NON_FINITE_LATENTS, image_problem

    pipe, family = target.pipe, target.family
    device = family.denoiser(pipe).device
    seeds = [parts[k].seeds[i] for k, i in rows]
    prompts = [parts[k].prompts[i] for k, i in rows]
    generators = seed_generators(seeds)  # one per row (padding rows too: a copy never advances the original's)
    starts = []
    for (k, i), g in zip(rows, generators):
        given = parts[k].latents
        starts.append(given[i].detach().to("cpu", torch.float32) if given is not None
                      else sampler.draw_noise([g], height, width)[0])
    z = torch.stack(starts)
    size = (z.shape[-2] * pipe.vae_scale_factor, z.shape[-1] * pipe.vae_scale_factor)
    conds = []
    start = 0
    while start < len(rows):  # consecutive rows of one part's learned token (or of plain prompts) encoded together
        learned = parts[rows[start][0]].learned
        end = start + 1
        while end < len(rows) and parts[rows[end][0]].learned is learned:
            end += 1
        chunk = prompts[start:end]
        conds.append(family.from_states(pipe, learned.encode(pipe, chunk), size=size).to(device) if learned is not None
                     else family.encode(pipe, chunk, device=device, size=size))
        start = end
    from erasekit.diffusion.conditioning import Conditioning

    cond = conds[0] if len(conds) == 1 else Conditioning.cat(conds)
    any_learned = any(parts[k].learned is not None for k, _ in rows)
    negatives = [negative_prompt] * len(rows) if negative_prompt is not None else None
    guidance, hooks = build_guidance(target, sampler, None if any_learned else prompts, None, negatives, scale, seeds,
                                     size=size, unet=unet_for(pipe), cond=cond)
    x = sampler.denoise(sampler.prepare_latents(z), guidance, hooks, generators=generators)
    finite = torch.isfinite(x).flatten(1).all(1).tolist()
    images = decode_latents(pipe, x, decode_batch(pipe))
    return images, [NON_FINITE_LATENTS if not ok else image_problem(im) for ok, im in zip(finite, images)]
