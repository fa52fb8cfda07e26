"""`erasekit generate`: images from prompts, through an optional edit and defences, resumable into a folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from erasekit.cli import common
from erasekit.errors import ErasekitError


def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="One or more prompts.", show_default=False),
    model: str = typer.Option("toy", "--model", "-m", help=common.MODEL_HELP),
    n: int = typer.Option(8, "-n", "--n", help="Images per prompt; prompt k's images use seeds SEED .. SEED+n-1."),
    seed: int = typer.Option(0, "--seed", help="First seed (the same seeds are used for every prompt)."),
    out: Path = typer.Option(Path("out/generate"), "--out", "-o", parser=common.out_folder, metavar="DIR", help="Output folder (PNGs, images.jsonl, grid.png)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the model's pipeline's: 20 toy, 25 SD, 28 SD3 and FLUX.1)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale; on FLUX.1 the distilled guidance (default: 5 toy, 7.5 SD, 5 SDXL, 7 SD3, 3.5 FLUX.1)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt for every image."),
    true_cfg: Optional[float] = typer.Option(None, "--true-cfg", help="FLUX.1 only: true classifier-free guidance at this scale (FluxPipeline's true_cfg_scale), --negative-prompt (or the empty prompt) as the unconditional branch; one more transformer pass a step (default: off)."),
    batch_size: str = typer.Option("32", "--batch-size", help="Images per forward pass (does not change the images), or auto: as many as free GPU memory holds."),
    fast: Optional[bool] = typer.Option(None, "--fast/--no-fast", show_default=False, help=common.FAST_HELP + " Default: auto, fast on CUDA when the images repay the compilation (erasekit.diffusion.speed.auto_fast)."),
    precision: str = typer.Option("default", "--precision", help=common.PRECISION_HELP),
    edit: Optional[Path] = typer.Option(None, "--edit", help="Apply a saved erasure edit (folder) before generating."),
    defence: Optional[List[str]] = typer.Option(None, "--defence", "--defense", help="Inference-time defence name[:key=value,...] (repeat to stack; see `erasekit ls`)."),
    concept: Optional[List[str]] = typer.Option(None, "--concept", "-c", help="The concept for defences that need one (irece, ...), as `attack` and the bench give them; one."),
    device: str = typer.Option("auto", "--device", help=common.DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=common.DTYPE_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=common.PICKLE_HELP),
) -> None:
    """Generate images; rerunning with the same arguments reuses the images already in --out."""
    from erasekit.checks import finite, integer
    from erasekit.limits import MAX_GUIDANCE, MAX_IMAGES, MAX_STEPS

    from erasekit.erasers.concept_list import one_concept

    concept = one_concept(concept, "generate")
    prompts = list(prompts or [])
    if not prompts:
        raise ErasekitError("give at least one prompt")
    if n < 1:
        raise ErasekitError(f"-n must be at least 1, got {n}")
    if batch_size != "auto":
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ErasekitError(f"--batch-size must be an integer or auto, got {batch_size!r}") from None
        if batch_size < 1:
            raise ErasekitError(f"--batch-size must be at least 1, got {batch_size}")
        integer("--batch-size", batch_size, high=65_536)
    integer("-n", n, high=MAX_IMAGES)
    if len(prompts) * n > MAX_IMAGES:
        raise ErasekitError(f"{len(prompts)} prompts x -n {n} = {len(prompts) * n} images, more than {MAX_IMAGES}")
    integer("--seed", seed, low=0, high=2**63 - 1)
    if steps is not None:
        integer("--steps", steps, low=1, high=MAX_STEPS)
    if guidance is not None:
        finite("--guidance", guidance, low=0, high=MAX_GUIDANCE)
    if true_cfg is not None:
        finite("--true-cfg", true_cfg, low=1, high=MAX_GUIDANCE)
    common.check_out_dir(out)
    common.resolve_dtype(dtype, "cpu")
    auto_fast = fast is None
    fast = common.fast_mode(bool(fast), precision, device)
    saved_edit = common.read_edit(edit)
    defences = common.read_defences(defence, concept)
    from erasekit.worlds import world_named

    known = world_named(model)
    if known is not None:  # its world is known without loading it: unknown concepts fail now
        common.check_defence_concepts(defences, known)
    from erasekit.folder_lock import hold_folder

    with hold_folder(out):
        target = common.load_target(model, edit=saved_edit, defences=defences, device=device, dtype=dtype,
                                    allow_pickle=allow_pickle)
        target = target.with_true_cfg(true_cfg)  # refused on all but FLUX.1; keyed apart (Target.cache_id)
        if auto_fast and fast is False and not target.family.flow:  # fast mode compiles UNets only
            from erasekit.diffusion.speed import auto_fast as choose

            steps0, guidance0 = target.world.sampler_defaults()
            fast, why = choose(target.family.denoiser(target.pipe).device, len(prompts) * n, steps or steps0,
                               guidance0 if guidance is None else guidance)
            if fast:
                print(f"--fast chosen automatically ({why}); --no-fast to sample eagerly", file=sys.stderr)
        from erasekit.generation import GenerationInputs, generate_to_dir

        inputs = GenerationInputs([p for p in prompts for _ in range(n)], [seed + i for _ in prompts for i in range(n)])
        records, generated = generate_to_dir(target, inputs, out, steps=steps, guidance=guidance,
                                             batch_size=batch_size, negative_prompt=negative_prompt, fast=fast)
    print(f"{len(records)} images in {out} ({generated} generated, {len(records) - generated} reused); "
          f"index {out / 'images.jsonl'}, grid {out / 'grid.png'}", file=sys.stderr)
