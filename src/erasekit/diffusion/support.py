"""Which components run on which denoiser. A component that reaches into a UNet (its cross-attention modules, its
blocks, `pipe.unet`) keeps the default ``needs_unet = True``; one that goes through the family's denoiser, schedule
and attention sites only says ``needs_unet = False``. On a transformer family (SD3, FLUX.1) a UNet-only component is
refused with one line before any work, instead of failing deep inside with an AttributeError."""

from __future__ import annotations

from erasekit.errors import ErasekitError


def check_runs_on(component, kind: str, pipe) -> None:
    """``component`` (a class or instance with ``name`` and ``needs_unet``) on ``pipe``; ``kind``: eraser, defence,
    attack or probe."""
    if not getattr(component, "needs_unet", True) or getattr(pipe, "unet", None) is not None:
        return
    raise ErasekitError(f"the {kind} {component.name!r} does not run on {type(pipe).__name__} yet (it needs a UNet); "
                        f"on transformer pipelines: {', '.join(transformer_components()) or 'none'}")


def transformer_components() -> list[str]:
    """Every registered component that runs on a transformer family, as ``kind name``."""
    from erasekit.registry import ATTACKS, DEFENCES, ERASERS, PROBES

    out = []
    for kind, registry in (("eraser", ERASERS), ("defence", DEFENCES), ("attack", ATTACKS), ("probe", PROBES)):
        out += [f"{kind} {name}" for name, cls in sorted(registry.classes().items())
                if not getattr(cls, "needs_unet", True)]
    return out
