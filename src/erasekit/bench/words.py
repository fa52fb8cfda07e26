"""What a bench method erases and keeps for a concept: its config's ``words`` and ``preserve`` read against the
model's world (used by the edits stage and by groups that erase several concepts at once)."""

from __future__ import annotations


def edit_words(value, world, concept: str) -> list[str]:
    """``words``: a list as given, "synonyms" (the world's words for the concept) or "name" (the concept alone)."""
    if isinstance(value, list):
        return list(value)
    return world.concept_words(concept) if value == "synonyms" else [concept]


def preserved_words(value, world, concept: str, method: str = "") -> list[str]:
    """``preserve``: a list as given, "world" (what the world's tuned settings for the method assume, as `erasekit
    erase` does), "others" (the world's other labels of the concept's kind) or "none"."""
    if isinstance(value, list):
        return list(value)
    if value == "world":
        return world.method_preserve(method, [concept])
    return world.other_labels(concept) if value == "others" else []
