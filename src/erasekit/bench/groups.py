"""Bench concept entries that erase several concepts at once (mass erasure, #24), and their H_o table.

    concepts:
      - name: shapes6                                          # a label for the group
        erase: [circle, square, triangle, star, heart, cross]  # and/or concepts_file: shapes.txt (one a line)
        retain: [plain, striped, dotted, checkered]            # default: the world's other labels of the erased kinds

Every erased concept (a member) is a concept of the plan as if listed alone: its own cells for every scenario, its
own detector and CRR. Each method computes ONE edit of all the members (their words; ``preserve: world`` is the
world's set for the whole list, ``others`` the other labels less the members) that every member's cells share, and
each member's preservation cell draws the retained concepts' prompts (the same prompts, seeds and edit for every
member: generated once). ``tables.harmonic`` of the summary: per group, method and scenario, the erased rate (the
mean of the members' CRRs), the retained rate (prompt following of the retention images) and MACE's H_o
(`erasekit.metrics.harmonic`). A concepts file is read when the config is validated and its lines become ``erase``
(the config's key and saved copy hold the list, not the path).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from erasekit.bench.spec import PreservePrompt, is_group
from erasekit.errors import ErasekitError


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[str, ...]
    retain: tuple[str, ...]

    def words_and_preserve(self, mcfg, world) -> tuple[list[str], list[str]]:
        """What a method of the config erases and keeps for the whole group."""
        from erasekit.bench.words import edit_words, preserved_words

        words = list(dict.fromkeys(w for m in self.members for w in edit_words(mcfg.words, world, m)))
        if isinstance(mcfg.preserve, list):
            return words, list(mcfg.preserve)
        if mcfg.preserve == "world":
            return words, world.method_preserve(mcfg.edit_name(), list(self.members))
        kept = [] if mcfg.preserve == "none" else [x for m in self.members
                                                   for x in preserved_words("others", world, m)]
        return words, [x for x in dict.fromkeys(kept) if x not in self.members]


def expand(cfg, world) -> tuple[list, dict[str, Group]]:
    """(the concept entries of the plan, member name -> its Group): each group's members as entries whose
    preservation prompts are the retained concepts' (the group's preserve_prompts when it gives them)."""
    entries, groups = [], {}
    for c in cfg.concepts:
        if not is_group(c):
            entries.append(c)
            continue
        members = tuple(world.check_concept(m) for m in c.erase)
        retain = tuple(r.strip() for r in c.retain) if c.retain is not None else tuple(
            dict.fromkeys(x for m in members for x in world.other_labels(m) if x not in members))
        if c.preserve_prompts is not None:
            prompts = list(c.preserve_prompts)
        else:
            if not retain:
                raise ErasekitError(f"config: concepts {c.name}: it erases every {', '.join(members)} the world has of "
                                    "their kind; name the concepts to keep (retain: [...]) or give preserve_prompts")
            prompts = retention_prompts(world, retain)
        group = Group(c.name, members, retain)
        for m in members:
            groups[m] = group
            entries.append(dataclasses.replace(c, name=m, erase=None, retain=None,
                                               preserve_prompts=[PreservePrompt(p.prompt, p.label) for p in prompts]))
    return entries, groups


def retention_prompts(world, retain) -> list:
    """(label, prompt) of the retained concepts, interleaved (image i of n asks for concept i mod len(retain))."""
    lists = [[PreservePrompt(p, r) for p in world.concept_prompts(world.check_concept(r))] for r in retain]
    out = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i % len(x)] for x in lists)
    return out


def harmonic_table(cfg, crr: dict, pres: dict) -> dict:
    """group -> method -> scenario -> {erased_rate, retained_rate, H_o, members, n}; {} when no entry is a group.
    ``crr``, ``pres``: the summary's CRR and preservation tables (`erasekit.bench.results`)."""
    from erasekit.metrics.harmonic import harmonic_erasure

    groups = [c for c in cfg.concepts if is_group(c)]
    if not groups:
        return {}
    table: dict = {}
    for g in groups:
        for m in cfg.methods:
            follow = [(pres.get(x, {}).get(m.name) or {}).get("following") for x in g.erase]
            follow = [f["crr"] for f in follow if f and f.get("crr") is not None]
            retained = sum(follow) / len(follow) if follow else None
            for s in cfg.scenarios:
                rates = [((crr.get(x, {}).get(m.name) or {}).get(s) or {}).get("crr") for x in g.erase]
                done = [r for r in rates if r is not None]
                erased = sum(done) / len(done) if len(done) == len(rates) else None
                h = harmonic_erasure(erased, retained) if erased is not None and retained is not None else None
                table.setdefault(g.name, {}).setdefault(m.name, {})[s] = {
                    "erased_rate": None if erased is None else round(erased, 4),
                    "retained_rate": None if retained is None else round(retained, 4),
                    "H_o": None if h is None else round(h, 4), "members": list(g.erase)}
    return table
