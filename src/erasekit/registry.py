"""One registry type for every kind of component: erasers, defences, attacks, probes and detectors.

A component is a class in a file of its own, decorated with ``@REGISTRY.register``; it names itself (``name``),
describes itself in one line (``summary``) and declares its settings (``Settings``, a `erasekit.settings.Settings`
dataclass, validated, settable as ``--set key=value``). A component with presets (NudeNet's detection rules) lists
them in ``presets``; ``name:preset`` then names it too. Each registry imports its package and every module in it on
first use, so that adding a component is adding its file, and ``erasekit --help`` stays fast.

    from erasekit.registry import ERASERS
    ERASERS.get("uce")            # the class; ErasekitError naming the choices for an unknown name
    ERASERS.names()               # exactly what the commands accept, and what ``erasekit ls`` lists
"""

from __future__ import annotations

import importlib

from erasekit.errors import ErasekitError


class Registry:
    def __init__(self, kind: str, package: str, option: str):
        self.kind = kind  # "eraser", "defence", ...
        self.package = package  # imported on first use: its modules register themselves
        self.option = option  # the command-line option that takes these names
        self._items: dict[str, type] = {}
        self._loaded = False

    def _load(self) -> None:
        """Import the package and every module in it: a component file registers itself, no list to edit."""
        if not self._loaded:
            self._loaded = True
            import pkgutil

            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")

    def register(self, cls: type) -> type:
        """Class decorator."""
        name = getattr(cls, "name", "")
        if not name or ":" in name or not getattr(cls, "summary", ""):
            raise ValueError(f"{cls.__name__}: a registered {self.kind} needs a name (without ':') and a summary")
        if self._items.get(name, cls) is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = cls
        settings = getattr(cls, "Settings", None)
        if settings is not None:  # errors name the component ("unknown setting 'x' for defence irece")
            shared = "owner" in vars(settings)  # one Settings class serving two components: name the kind only
            settings.owner = self.kind if shared else f"{self.kind} {name}"
        return cls

    def split(self, spec: str) -> tuple[type, str | None]:
        """(class, preset or None) for ``name`` or ``name:preset``."""
        self._load()
        name, _, preset = str(spec).strip().partition(":")
        if name not in self._items:
            raise ErasekitError(f"unknown {self.kind} {spec!r}; available: {', '.join(self.names())}")
        cls = self._items[name]
        if "=" in preset and getattr(cls, "spec_settings", False):
            return cls, None  # "clip:model=FOLDER,...": settings, parsed by the component's kind (detectors)
        presets = tuple(getattr(cls, "presets", ()) or ())
        if preset and preset not in presets:
            raise ErasekitError(f"unknown {self.kind} preset {spec!r}; available: {', '.join(self.names())}")
        return cls, preset or None

    def get(self, spec: str) -> type:
        return self.split(spec)[0]

    def classes(self) -> dict[str, type]:
        self._load()
        return dict(sorted(self._items.items()))

    def names(self) -> list[str]:
        """Every name a command accepts: each component, and ``name:preset`` for its presets."""
        out = []
        for name, cls in self.classes().items():
            out.append(name)
            out.extend(f"{name}:{p}" for p in getattr(cls, "presets", ()) or ())
        return out

    def describe(self) -> dict[str, str]:
        out = {}
        for name, cls in self.classes().items():
            out[name] = cls.summary
            describe_preset = getattr(cls, "describe_preset", None)
            for p in getattr(cls, "presets", ()) or ():
                out[f"{name}:{p}"] = describe_preset(p) if describe_preset else ""
        return out

    def __contains__(self, spec: str) -> bool:
        try:
            self.split(spec)
        except ErasekitError:
            return False
        return True


ERASERS = Registry("erasure method", "erasekit.erasers", "--method")
DEFENCES = Registry("defence", "erasekit.defences", "--defence")
ATTACKS = Registry("attack", "erasekit.attacks", "--scenario")
PROBES = Registry("probe", "erasekit.probes", "--probe")
DETECTORS = Registry("detector", "erasekit.detectors", "--detector")

ALL = {"erasers": ERASERS, "defences": DEFENCES, "attacks": ATTACKS, "probes": PROBES, "detectors": DETECTORS}
