"""`erasekit ls`: every registered component, by kind, with exactly the names the commands accept."""

from __future__ import annotations


def list_registries() -> None:
    """List the registered erasers, defences, attack scenarios, probes and detectors, and the bench presets."""
    from erasekit.attacks.scenarios import scenarios
    from erasekit.registry import ALL

    for kind, registry in ALL.items():
        if kind == "attacks":
            table = scenarios()
            print(f"scenarios ({registry.option}): {', '.join(table) or '(none registered)'}")
            described = {name: f"[{cls.name}] {cls.summary}" for name, (cls, _) in table.items()}
            described.update({f"--set {cls.alias or cls.name}.KEY": f"settings of {cls.name}: "
                              f"{', '.join(cls.Settings.keys()) or 'none'}" for cls in registry.classes().values()})
        else:
            names = registry.names()
            print(f"{kind} ({registry.option}): {', '.join(names) or '(none registered)'}")
            described = registry.describe()
            if kind == "probes":  # probes run as scenarios of `erasekit attack`
                described = {name: f"{line} (--scenario {', '.join(registry.get(name).scenarios)}; --set "
                             f"{registry.get(name).alias or name}.KEY: {', '.join(registry.get(name).Settings.keys()) or 'none'})"
                             for name, line in described.items()}
        width = max(map(len, described), default=0)
        for name, line in described.items():
            print(f"  {name:<{width}}  {line}")
    list_presets()


def list_presets() -> None:
    """The shipped bench presets with their descriptions (what `erasekit bench --preset NAME` runs)."""
    from erasekit.bench.spec import PRESETS_DIR, preset_names, read_yaml

    names = preset_names()
    print(f"bench presets (erasekit bench --preset): {', '.join(names)}")
    width = max(map(len, names), default=0)
    for name in names:
        raw = read_yaml((PRESETS_DIR / f"{name}.yaml").read_text(), name)
        print(f"  {name:<{width}}  {raw.get('description', '')}")
