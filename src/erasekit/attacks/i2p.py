"""Prompts from a CSV in the I2P layout (Schramowski et al.'s Inappropriate Image Prompts).

Columns: ``prompt`` (required), ``evaluation_seed`` and ``evaluation_guidance`` (per-row seed and guidance
scale, honoured when present), optional ``categories`` and ``case_number`` (recorded with each image). Other
columns are ignored. An empty cell of ``evaluation_seed`` falls back to the row index, of
``evaluation_guidance`` to the pipeline's default.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

from erasekit.attacks.base import AttackInputs
from erasekit.errors import ErasekitError
from erasekit.limits import MAX_IMAGES, shown


@dataclass(frozen=True)
class I2PRow:
    prompt: str
    seed: int
    guidance: float | None
    categories: str | None = None
    case_number: str | None = None
    seed_given: bool = True  # False: the row had no evaluation_seed (seeded by its row number)


def _number(value: str, kind, what: str, path: Path, line: int):
    """A seed (a whole number in torch.Generator.manual_seed's range) or a guidance scale (finite, >= 0)."""
    from erasekit.checks import finite, integer

    name = f"{path}, line {line}: {what}"
    try:
        float(value)
    except ValueError:
        raise ErasekitError(f"{name} {value!r} is not a number") from None
    if kind is int:
        return integer(name, value, low=-(2**63), high=2**64 - 1)
    from erasekit.limits import MAX_GUIDANCE

    return finite(name, value, low=0.0, high=MAX_GUIDANCE)  # the bound of every entry point


def load_i2p_csv(path) -> list[I2PRow]:
    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"prompt CSV {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)  # strict: an unterminated quote is an error, not one huge cell
            header = [h.strip() for h in (reader.fieldnames or [])]
            if "prompt" not in header:
                raise ErasekitError(
                    f"{path} has no 'prompt' column (I2P layout: prompt, evaluation_seed, evaluation_guidance, "
                    f"[categories, case_number]); its columns: {shown(', '.join(header) or 'none', 200)}"
                )
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise ErasekitError(f"{path}: the column {shown(twice[0])!r} is given twice in the header")
            rows = []
            for i, raw in enumerate(reader):
                line = reader.line_num
                if None in raw or None in raw.values():  # more or fewer cells than the header has columns
                    cells = len(header) + len(raw.get(None) or []) - sum(v is None for v in raw.values())
                    raise ErasekitError(f"{path}, line {line}: {cells} cells, the header has {len(header)} columns")
                if i >= MAX_IMAGES:
                    raise ErasekitError(f"{path}: more than {MAX_IMAGES} rows")
                raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                seed = raw.get("evaluation_seed", "")
                guidance = raw.get("evaluation_guidance", "")
                rows.append(I2PRow(
                    prompt=raw["prompt"],
                    seed=_number(seed, int, "evaluation_seed", path, line) if seed else i,
                    guidance=_number(guidance, float, "evaluation_guidance", path, line) if guidance else None,
                    categories=raw.get("categories") or None,
                    case_number=raw.get("case_number") or None,
                    seed_given=bool(seed),
                ))
    except UnicodeDecodeError as exc:
        raise ErasekitError(f"{path} is not a UTF-8 text CSV ({exc.reason})") from None
    except csv.Error as exc:
        raise ErasekitError(f"{path} is not a readable CSV: {shown(exc, 200)}") from None
    if not rows:
        raise ErasekitError(f"{path} has a header but no prompts")
    return rows


def i2p_inputs(rows: list[I2PRow], n: int | None = None) -> AttackInputs:
    """One image per row with the row's seed and guidance; ``n`` > rows repeats them with seed + 1, + 2, ..."""
    t0 = time.perf_counter()
    n = len(rows) if n is None else n
    if n < 1:
        raise ErasekitError(f"-n must be at least 1, got {n}")
    picked = [(rows[i % len(rows)], i // len(rows)) for i in range(n)]
    return AttackInputs(
        attack="i2p",
        prompts=[r.prompt for r, _ in picked],
        seeds=[r.seed + rep for r, rep in picked],
        guidance=[r.guidance for r, _ in picked],
        items=[{k: v for k, v in (("case_number", r.case_number), ("categories", r.categories)) if v is not None}
               for r, _ in picked],
        budget={"prompts": len(rows), "images_used": 0, "optimisation_steps": 0,
                "wall_s": round(time.perf_counter() - t0, 4)},
    )
