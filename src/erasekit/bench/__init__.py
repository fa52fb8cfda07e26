"""The benchmark: YAML configs (`spec`), cells and image jobs (`plan`), the cached, resumable, sharded runner
(`run`), and the tables of its results (`results`). ``erasekit bench`` runs it; ``erasekit report`` redraws it."""

from erasekit.bench.spec import BenchConfig, load_config, parse_config, preset_names

__all__ = ["BenchConfig", "load_config", "parse_config", "preset_names"]
