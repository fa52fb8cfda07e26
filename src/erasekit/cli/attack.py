"""`erasekit attack`: run one scenario against a model (optionally edited and defended) and measure CRR."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from erasekit.cli import common


def attack(
    scenario: str = typer.Option(..., "--scenario", "-s", help="A scenario (see `erasekit ls`): text, embedding-bb, embedding-wb, latent-bb, latent-wb."),
    concept: List[str] = typer.Option(..., "--concept", "-c", help="The concept to bring back (toy: a shape, colour or texture); one."),
    out: Path = typer.Option(..., "--out", "-o", parser=common.out_folder, metavar="DIR", help="Output folder: images, scores.jsonl, summary.json."),
    model: str = typer.Option("toy", "--model", "-m", help=common.MODEL_HELP),
    edit: Optional[Path] = typer.Option(None, "--edit", help="A saved erasure edit (folder) to attack; default: the original model."),
    defence: Optional[List[str]] = typer.Option(None, "--defence", "--defense", help="Inference-time defence name[:key=value,...] (repeat to stack); one that needs a concept (irece, ...) takes --concept."),
    n: int = typer.Option(100, "-n", "--n", help="Images to generate in total."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of concept images (embedding / latent scenarios); toy default: rendered."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text and unlearndiffatk scenarios: an I2P-layout CSV (prompt, evaluation_seed, evaluation_guidance); each row's seed (or its row number) seeds its image, so --seed does not apply."),
    detector: Optional[str] = typer.Option(None, "--detector", help="A registered detector: toy, nudenet, nudenet:rece, ... (default: the model's world's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="First generation seed (default 0); ignored, with a warning, for --prompts rows, which carry their own seeds.", show_default=False),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling (and inversion) steps; default: the model's."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Sampling guidance scale; default: the model's (I2P rows: their own)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    fast: bool = typer.Option(False, "--fast", help=common.FAST_HELP),
    precision: str = typer.Option("default", "--precision", help=common.PRECISION_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Attack setting <attack>.<key>=value (repeat), e.g. ti.steps=800, inversion.prompt_mode=concept; see `erasekit ls`."),
    device: str = typer.Option("auto", "--device", help=common.DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=common.DTYPE_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=common.PICKLE_HELP),
) -> None:
    """Attack a model through one input surface and measure the concept reproduction rate (CRR)."""
    from erasekit.attacks.scenarios import ScenarioConfig, attack_of, run_scenario, split_settings
    from erasekit.checks import integer

    from erasekit.erasers.concept_list import one_concept

    concept = one_concept(concept, "attack")
    seed_given = seed is not None
    seed = 0 if seed is None else seed
    cfg = ScenarioConfig(scenario=scenario, concept=concept.strip(), n=n, seed=seed, steps=steps, guidance=guidance,
                         batch_size=batch_size, settings=split_settings(common.parse_sets(set_)),
                         fast=common.fast_mode(fast, precision, device))
    cfg.validate()  # every argument checked before a model is loaded
    integer("--seed", seed, low=0, high=2**63 - 1)
    cls, _ = attack_of(scenario)
    if images is not None:
        if cls.name == "text":
            from erasekit.errors import ErasekitError

            raise ErasekitError("--images belongs to the embedding and latent scenarios; the text scenario uses prompts")
        from erasekit.attacks.images import image_files

        image_files(images)  # exists and holds images (each is read, converted or refused later)
    if prompts is not None:
        if cls.name not in ("text", "unlearndiffatk"):  # UnlearnDiffAtk attacks the rows' prompts (#20)
            from erasekit.errors import ErasekitError

            raise ErasekitError("--prompts (an I2P-layout CSV) belongs to the text scenario (or unlearndiffatk)")
        from erasekit.attacks.i2p import load_i2p_csv

        rows = load_i2p_csv(prompts)
        if seed_given:
            print(f"warning: --seed {seed} is ignored: the images of {prompts} are seeded by its rows "
                  f"({sum(r.seed_given for r in rows)} of {len(rows)} with their own evaluation_seed, the others "
                  f"by their row number)", file=sys.stderr)
    common.check_out_dir(out)
    common.resolve_dtype(dtype, "cpu")
    saved_edit = common.read_edit(edit)
    defences = common.read_defences(defence, cfg.concept)  # irece & co. take the attacked concept
    from erasekit.worlds import world_named

    known = world_named(model)
    if known is not None:  # its world is known without loading it: unknown concepts fail now
        known.check_concept(cfg.concept)
        common.check_defence_concepts(defences, known)
    if detector is not None:
        from erasekit.registry import DETECTORS

        DETECTORS.split(detector)

    from erasekit.folder_lock import hold_folder

    with hold_folder(out):
        target = common.load_target(model, edit=saved_edit, defences=defences, device=device, dtype=dtype,
                                    allow_pickle=allow_pickle)
        det = target.world.detector(cfg.concept, detector)  # its weights loaded now: fail before generating
        summary = run_scenario(cfg, target, det, out, images_folder=images, prompts_csv=prompts)
    low, high = summary["ci"]
    invalid = summary.get("invalid") or 0
    # Degenerate images (NaN latents, constant images) count in no rate: a broken model is not a perfect eraser.
    crr = (f"CRR {summary['crr']:.3f} (95% CI {low:.3f}-{high:.3f}, n={summary['n']})" if summary["crr"] is not None
           else f"no CRR: all {invalid} images are invalid")
    if invalid:
        crr += (f"; {invalid} invalid image(s) left out ({'; '.join(summary.get('invalid_reasons') or [])}): "
                f"the model or the sampler settings are broken")
    print(
        f"{scenario} / {cfg.concept}: {crr}, "
        f"detector {summary['detector']['name']} {summary['detector'].get('preset') or ''}; "
        f"{summary['generation']['images_generated']} generated, {summary['generation']['images_reused']} reused; "
        f"{summary['wall_s']:.1f} s; {out / 'summary.json'}",
        file=sys.stderr,
    )
