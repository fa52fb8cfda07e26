"""`erasekit attack`: run one M-ErasureBench scenario against a model (optionally edited) and measure CRR.

Registered in `erasekit.cli`; heavy imports happen inside the command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from erasekit.errors import ErasekitError


def attack_command(
    scenario: str = typer.Option(..., "--scenario", "-s", help="text | embedding-bb | embedding-wb | latent-bb | latent-wb"),
    concept: str = typer.Option(..., "--concept", "-c", help="The concept to bring back (toy: a shape, colour or texture)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: images, scores.jsonl, summary.json."),
    model: str = typer.Option("toy", "--model", "-m", help="'toy', a diffusers pipeline folder, or a hub id in the local cache."),
    edit: Optional[Path] = typer.Option(None, "--edit", help="A saved erasure edit (folder) to attack; default: the original model."),
    prompt_mode: str = typer.Option("empty", "--prompt-mode", help="Latent scenarios: regenerate with the empty prompt or the concept prompt."),
    n: int = typer.Option(100, "-n", "--n", help="Images to generate in total."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of concept images (embedding / latent scenarios); toy default: rendered."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text scenario: an I2P-layout CSV (prompt, evaluation_seed, evaluation_guidance)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="toy, nudenet, nudenet:rece, ... (default: fits the model and concept)."),
    seed: int = typer.Option(0, "--seed", help="First generation seed."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling (and inversion) steps; default: the model's."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Sampling guidance scale; default: the model's (I2P rows: their own)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    ti_steps: int = typer.Option(400, "--ti-steps", help="Textual inversion: optimisation steps."),
    ti_batch_size: int = typer.Option(16, "--ti-batch-size", help="Textual inversion: batch size."),
    ti_lr: float = typer.Option(5e-3, "--ti-lr", help="Textual inversion: Adam learning rate."),
    ti_vectors: int = typer.Option(1, "--ti-vectors", help="Textual inversion: vectors per token."),
    ti_init: str = typer.Option("object", "--ti-init", help="Textual inversion: initialiser word."),
    ti_images: int = typer.Option(32, "--ti-images", help="Textual inversion: rendered images to learn from (toy, no --images)."),
    inversion_guidance: float = typer.Option(1.0, "--inversion-guidance", help="DDIM inversion guidance scale."),
    inversion_prompt: str = typer.Option("", "--inversion-prompt", help="DDIM inversion prompt (default: empty)."),
    refine: int = typer.Option(0, "--refine", help="DDIM inversion: fixed-point refinements per step (0 = plain DDIM inversion)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16."),
) -> None:
    """Attack a model through one input surface and measure the concept reproduction rate (CRR)."""
    from erasekit import cli
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario, with_token
    from erasekit.attacks.textual_inversion import TextualInversionConfig

    cfg = with_token(ScenarioConfig(
        scenario=scenario, concept=concept.strip(), n=n, prompt_mode=prompt_mode, seed=seed, steps=steps,
        guidance=guidance, batch_size=batch_size,
        ti=TextualInversionConfig(num_vectors=ti_vectors, initializer=ti_init, steps=ti_steps,
                                  batch_size=ti_batch_size, lr=ti_lr),
        ti_images=ti_images, inversion_guidance=inversion_guidance, inversion_prompt=inversion_prompt, refine=refine,
    ))
    cfg.validate()  # every argument checked before a model is loaded
    if not cfg.concept:
        raise ErasekitError("--concept is empty")
    if images is not None:
        if scenario == "text":
            raise ErasekitError("--images belongs to the embedding and latent scenarios; the text scenario uses prompts")
        from erasekit.attacks.images import image_files

        image_files(images)  # exists and holds images (each is read, converted or refused later)
    if prompts is not None:
        if scenario != "text":
            raise ErasekitError("--prompts (an I2P-layout CSV) belongs to the text scenario")
        from erasekit.attacks.i2p import load_i2p_csv

        load_i2p_csv(prompts)
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"--out {out} exists and is not a folder")
    saved_edit = cli._load_edit(edit) if edit is not None else None

    from erasekit.detectors import default_detector_for, get_detector

    det = get_detector(detector or default_detector_for(model, cfg.concept), concept=cfg.concept)
    if getattr(det, "name", "") == "toy":
        det.model  # noqa: B018  (load the weights now: fail before generating)

    cli._setup_torch()
    from erasekit.models import load_pipeline

    dev = cli._resolve_device(device)
    original = load_pipeline(model, device=dev, dtype=cli._resolve_dtype(dtype, dev))
    target, edit_id = original, None
    if saved_edit is not None:
        import copy

        base = copy.deepcopy(original) if scenario.endswith("-bb") else original
        applied = saved_edit.apply(base)
        target = base if applied is None else applied
        edit_id = f"{edit.name}@{cli.dir_digest(edit)}"
    summary = run_scenario(cfg, original, target, det, out, images_folder=images, prompts_csv=prompts, model=model,
                           edit=edit_id)
    low, high = summary["ci"]
    print(
        f"{scenario} / {cfg.concept}: CRR {summary['crr']:.3f} (95% CI {low:.3f}-{high:.3f}, n={summary['n']}), "
        f"detector {summary['detector']['name']} {summary['detector'].get('preset') or ''}; "
        f"{summary['generation']['images_generated']} generated, {summary['generation']['images_reused']} reused; "
        f"{summary['wall_s']:.1f} s; {out / 'summary.json'}",
        file=sys.stderr,
    )
