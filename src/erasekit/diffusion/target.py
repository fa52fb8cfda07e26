"""A `Target`: the pipeline under test, with the weight edits and defences that apply to it while it samples.

    original = Target(pipe, model="toy", world=TOY_WORLD)   # its world: erasekit.worlds (world_of(pipe))
    erased = original.with_edits(load_edit("out/uce-star")).with_defences(irece)
    with erased.active():        # weight edits copied in; always reverted on exit, also on errors
        ...                      # generate / invert / learn through `erased`
    erased.cache_id              # base fingerprint (hashed once) + edit digests + defence records
    flux.with_true_cfg(4.0)      # FLUX.1: true classifier-free guidance while it samples (keyed apart)

Targets made from one another share the pipeline (no copies) and the base fingerprint, which is hashed once: a
black-box attack learns on ``original`` and generates with ``erased``, one after the other, on the same weights.
Which edits are in the weights is tracked on the pipeline itself, so a `Target` can tell whether it is active.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

from erasekit.errors import ErasekitError

_APPLIED = "_erasekit_applied_edits"  # attribute on the pipeline: the edits whose tensors are in its weights now


class _Shared:
    """State shared by a target and every target derived from it."""

    def __init__(self, fingerprint: str | None, world=None):
        self.fingerprint = fingerprint
        self.world = world


class Target:
    def __init__(self, pipe, *, model: str = "", world=None, edits: Sequence = (), defences: Sequence = (),
                 base_fingerprint: str | None = None, _shared: _Shared | None = None, true_cfg: float | None = None):
        self.pipe = pipe
        self.model = model
        self.edits = tuple(edits)
        self.defences = tuple(defences)
        self._shared = _shared or _Shared(base_fingerprint, world)
        # FLUX.1's true classifier-free guidance scale while sampling (None: off, the distilled guidance alone)
        self.true_cfg = None if true_cfg is None or float(true_cfg) == 1.0 else float(true_cfg)

    # -- derived targets ------------------------------------------------------------------------------
    def _derive(self, edits, defences) -> "Target":
        return Target(self.pipe, model=self.model, edits=edits, defences=defences, _shared=self._shared,
                      true_cfg=self.true_cfg)

    def with_true_cfg(self, scale: float | None) -> "Target":
        """The same target sampling with FLUX.1's true CFG at ``scale`` (FluxPipeline's ``true_cfg_scale``: the
        negative prompt, or the empty one, as the unconditional branch; None or 1: off). Other families refuse it."""
        from erasekit.diffusion.flux import check_true_cfg

        check_true_cfg(self.pipe, scale)
        derived = self._derive(self.edits, self.defences)
        derived.true_cfg = None if scale is None or float(scale) == 1.0 else float(scale)
        return derived

    def with_edits(self, *edits) -> "Target":
        return self._derive(self.edits + tuple(e for e in edits if e is not None), self.defences)

    def with_defences(self, *defences) -> "Target":
        from erasekit.diffusion.support import check_runs_on

        for d in defences:
            if d is not None:
                check_runs_on(d, "defence", self.pipe)
        return self._derive(self.edits, self.defences + tuple(d for d in defences if d is not None))

    def original(self) -> "Target":
        """The same pipeline with nothing applied."""
        return self._derive((), ())

    def without_defences(self) -> "Target":
        return self._derive(self.edits, ())

    # -- identity --------------------------------------------------------------------------------------
    @property
    def world(self):
        """What a concept means for this model (`erasekit.worlds`): the one it was made with. A target made without
        one (a bare pipeline handed to the library API) asks `erasekit.worlds.world_of` once, on first use."""
        if self._shared.world is None:
            from erasekit.worlds import world_of

            self._shared.world = world_of(self.pipe)
        return self._shared.world

    @property
    def family(self):
        from erasekit.diffusion.family import family_of

        return family_of(self.pipe)

    @property
    def base_fingerprint(self) -> str:
        """The unedited model's fingerprint, hashed once (with no edit in the weights)."""
        if self._shared.fingerprint is None:
            from erasekit.models.fingerprint import fingerprint

            if getattr(self.pipe, _APPLIED, ()):
                with self._swapped(()):
                    self._shared.fingerprint = fingerprint(self.pipe)
            else:
                self._shared.fingerprint = fingerprint(self.pipe)
        return self._shared.fingerprint

    def edit_ids(self) -> list[str]:
        return [f"{e.method}@{e.digest()}" for e in self.edits]

    def defence_records(self) -> list[dict]:
        return [d.record() for d in self.defences]

    @property
    def cache_id(self) -> str:
        """Identifies what this target generates: base weights, edits and defences."""
        from erasekit.store import content_key

        if self.true_cfg is not None:  # other images; without it the key is what it always was
            return content_key(self.base_fingerprint, self.edit_ids(), self.defence_records(),
                               {"true_cfg": self.true_cfg})
        return content_key(self.base_fingerprint, self.edit_ids(), self.defence_records())

    def describe(self) -> dict:
        out = {"model": self.model, "fingerprint": self.base_fingerprint, "edits": self.edit_ids() or None,
               "defences": self.defence_records() or None}
        if self.true_cfg is not None:
            out["true_cfg"] = self.true_cfg
        return out

    # -- applying --------------------------------------------------------------------------------------
    def _check(self, edit) -> None:
        base = getattr(edit, "base_fingerprint", None)
        if base is not None and base != self.base_fingerprint:
            hint = ""
            want, have = getattr(edit, "base_dtype", ""), str(self.pipe.unet.dtype)
            if want and want != have:
                hint = f"; the edit was made on {want} weights and this pipeline is {have}: load it in {want.replace('torch.', '')}"
            raise ErasekitError(f"this {edit.method} edit was made for a model with fingerprint {base}, but the "
                                f"pipeline's fingerprint is {self.base_fingerprint}{hint or '; apply it to the model it was made for'}")

    @contextmanager
    def _swapped(self, edits: tuple):
        """Make exactly ``edits`` be in the weights for the block, then put back what was there."""
        before = tuple(getattr(self.pipe, _APPLIED, ()))
        if before == edits:
            yield
            return
        for e in reversed(before):
            e.revert(self.pipe)
        setattr(self.pipe, _APPLIED, ())
        try:
            for e in edits:
                e.apply(self.pipe, verify=False)
                setattr(self.pipe, _APPLIED, getattr(self.pipe, _APPLIED) + (e,))
            yield
        finally:
            for e in reversed(getattr(self.pipe, _APPLIED)):
                e.revert(self.pipe)
            setattr(self.pipe, _APPLIED, ())
            for e in before:
                e.apply(self.pipe, verify=False)
                setattr(self.pipe, _APPLIED, getattr(self.pipe, _APPLIED) + (e,))

    @contextmanager
    def active(self):
        """This target's weight edits in the pipeline's weights for the block (re-entrant; always restored), and its
        true-CFG scale set on the pipeline's transformer (FLUX.1)."""
        from erasekit.diffusion.flux import true_cfg_scope

        for e in self.edits:
            self._check(e)
        with self._swapped(self.edits), true_cfg_scope(self.pipe, self.true_cfg):
            yield self

    @contextmanager
    def without_edits(self):
        """The unedited weights for the block, inside `active` (defences that consult the original model)."""
        with self._swapped(()):
            yield self


def as_target(pipe_or_target, model: str = "", world=None) -> Target:
    return pipe_or_target if isinstance(pipe_or_target, Target) else Target(pipe_or_target, model=model, world=world)
