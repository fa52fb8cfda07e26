"""The benchmark: YAML configs (`spec`, `groups`, `words`), cells and image jobs (`cells`, `plan`), the cached,
resumable, sharded runner (`run`: orchestration; `stages`: edits, attacks, generation, scoring; `costs`; `layout`:
the results folder), and the tables of its results (`results`, `quality`). ``erasekit bench`` runs it;
``erasekit report`` redraws it."""

from erasekit.bench.spec import BenchConfig, load_config, parse_config, preset_names

__all__ = ["BenchConfig", "load_config", "parse_config", "preset_names"]
