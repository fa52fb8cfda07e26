"""A broken model must never read as a perfect eraser (issue #18).

Weights: an edit or a model with NaN or infinite weights makes black (NaN) images, which a detector scores as
"concept absent": a CRR of 0%. `check_finite_tensors` refuses such weights where they are made (the erase step:
nothing is saved) and where they are read (an edit, a model folder).

Images: whatever still comes out degenerate (non-finite latents, which decode to NaN pixels and then to one flat
colour; an image whose every pixel is the same) is *invalid*: `image_problem` names why. Invalid images keep their
detector row, flagged ``valid: false`` with the reason in ``invalid``, and count in no rate: a CRR is k / n over
the valid images, and the number of invalid ones is reported beside it in every table (`erasekit.metrics.crr`).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from erasekit.errors import ErasekitError

NON_FINITE_LATENTS = "non-finite latents (NaN or inf: the model or the sampler settings diverged)"


def nonfinite_names(tensors: Mapping[str, "object"]) -> list[str]:
    """Names of the tensors in ``tensors`` holding a NaN or an infinity."""
    import torch

    bad = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            if not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def check_finite_tensors(tensors: Mapping[str, "object"], what: str, hint: str = "") -> None:
    """`ErasekitError` naming ``what`` and the first bad tensor unless every tensor is finite."""
    bad = nonfinite_names(tensors)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ErasekitError(f"{what} holds non-finite weights (NaN or inf) in {len(bad)} of {len(tensors)} tensors "
                            f"({bad[0]}{more}){': ' + hint if hint else ''}")


def check_finite_pipeline(pipe, where: str) -> None:
    """Every floating-point parameter and buffer of the pipeline's models is finite (checked once, at load)."""
    import torch

    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if not isinstance(module, torch.nn.Module):
            continue
        with torch.no_grad():
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                    raise ErasekitError(f"{where}: the {component} has non-finite weights (NaN or inf, first in "
                                        f"{name}): the model is broken and would make blank images; refusing it")


def image_problem(image: np.ndarray) -> str | None:
    """Why a uint8 (H, W, 3) image is degenerate, or None: every pixel the same colour (what NaN latents decode to)."""
    a = np.asarray(image)
    if a.size == 0:
        return "empty image"
    flat = a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a.reshape(-1, 1)
    if (flat == flat[0]).all():
        colour = ", ".join(str(int(v)) for v in flat[0])
        return f"constant image (every pixel ({colour}))"
    return None


def image_problems(images: Iterable[np.ndarray]) -> list[str | None]:
    return [image_problem(im) for im in images]


def validity_fields(problem: str | None) -> dict:
    """The fields a result row carries: ``valid`` always, ``invalid`` (the reason) when not valid."""
    return {"valid": True} if problem is None else {"valid": False, "invalid": problem}
