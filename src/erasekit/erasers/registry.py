"""The registry of erasure methods: ``@register`` on a class, ``get(name)`` to find it, ``list_methods()`` for
``erasekit ls``. Method modules are imported by ``erasekit.erasers`` so that registering happens on import."""

from __future__ import annotations

from erasekit.errors import ErasekitError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator; the class names itself (``name``) and describes itself in one line (``summary``)."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} has no name")
        if name in self._items and self._items[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = cls
        return cls

    def get(self, name: str) -> type:
        try:
            return self._items[name]
        except KeyError:
            raise ErasekitError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        return {name: getattr(self._items[name], "summary", "") for name in self.names()}

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


REGISTRY = Registry("erasure method")
register = REGISTRY.register
get = REGISTRY.get


def list_methods() -> dict[str, str]:
    """Method name -> one-line description."""
    return REGISTRY.describe()
