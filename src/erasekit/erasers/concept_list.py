"""Lists of concepts to erase at once (mass erasure, #24): ``--concept`` repeated and ``--concepts-file``, and the
bench's ``erase:`` / ``concepts_file:`` entries, read and checked by the same rules.

A concepts file holds one concept a line; blank lines and lines starting with ``#`` are skipped. Repeats are
dropped (the first kept) with a warning: a long list that names a concept twice erases it once either way.
Methods that erase one concept at a time (ESD) refuse a list of several (`Method.several_concepts`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from erasekit.errors import ErasekitError

MAX_CONCEPTS = 10_000  # concepts one edit erases (MACE and SPEED report up to 100; a file is bounded before reading)
MAX_FILE_BYTES = 1_000_000


def read_concepts_file(path: str | Path, where: str = "--concepts-file") -> list[tuple[str, str]]:
    """(concept, "FILE:LINE") for every concept line of ``path``."""
    from erasekit.limits import shown

    path = Path(path).expanduser()
    if not path.is_file():
        raise ErasekitError(f"{where} {shown(path)}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ErasekitError(f"{where} {shown(path)}: larger than {MAX_FILE_BYTES:,} bytes; a concept list is a few "
                            "words a line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ErasekitError(f"{where} {shown(path)}: cannot read it as UTF-8 text ({type(exc).__name__})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((line, f"{path.name}:{n}"))
    if not out:
        raise ErasekitError(f"{where} {shown(path)} lists no concept (only blank lines or # comments); give one "
                            "concept a line")
    return out


def concept_list(given: Sequence[str] = (), file: str | Path | None = None, *, where: str = "--concept",
                 warn: Callable[[str], None] | None = None) -> list[str]:
    """The concepts of ``given`` then of ``file``, stripped, checked (printable, not blank) and without repeats
    (dropped with a ``warn`` line when ``warn`` is given, else an error)."""
    from erasekit.limits import shown

    items = [(text, where) for text in given]
    if file is not None:
        items += read_concepts_file(file, "--concepts-file" if where == "--concept" else f"{where} file")
    if not items:
        raise ErasekitError(f"the concept list is empty: give {where} (repeat it for several) or a concepts file")
    if len(items) > MAX_CONCEPTS:
        raise ErasekitError(f"{len(items):,} concepts: at most {MAX_CONCEPTS:,} in one edit")
    out: dict[str, str] = {}
    repeats = []
    for text, origin in items:
        concept = text.strip()
        if not concept:
            raise ErasekitError(f"{origin}: a concept is empty; give a word or phrase")
        if not concept.isprintable():
            raise ErasekitError(f"{origin}: concept '{shown(concept)}' holds control characters")
        if concept in out:
            repeats.append(concept)
            continue
        out[concept] = origin
    if repeats and warn is None:  # a config lists each concept once (as its concepts: entries)
        raise ErasekitError(f"{where}: {shown(repeats[0])!r} is listed twice")
    if repeats:
        shown_repeats = ", ".join(repr(shown(r)) for r in list(dict.fromkeys(repeats))[:5])
        warn(f"warning: {len(repeats)} repeated concept(s) erased once: {shown_repeats}"
             f"{' ...' if len(set(repeats)) > 5 else ''}")
    return list(out)


def check_method_takes(method_cls, concepts: Sequence[str], where: str = "--concept") -> None:
    """`ErasekitError` when ``method_cls`` erases one concept at a time and ``concepts`` holds several."""
    if len(concepts) > 1 and not getattr(method_cls, "several_concepts", True):
        several = ", ".join(n for n, c in _registered() if getattr(c, "several_concepts", True))
        raise ErasekitError(f"{method_cls.name} erases one concept at a time, {len(concepts)} were given ({where}); "
                            f"erase several at once with {several}")


def one_concept(values: Sequence[str] | None, command: str) -> str | None:
    """The one ``--concept`` of a command that takes one (``attack``: the concept attacked; ``generate``: its
    defences'); several are refused, never the last silently kept (click's way with a repeated option)."""
    values = list(values or [])
    if len(values) > 1:
        raise ErasekitError(f"{command} takes one --concept, {len(values)} were given; attack a mass erasure's "
                            "concepts one at a time (the bench does this for an entry that erases several)")
    return values[0] if values else None


def _registered():
    from erasekit.registry import ERASERS

    return list(ERASERS.classes().items())
