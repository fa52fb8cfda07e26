"""YAML for configs: safe types only, no anchors or aliases, no duplicate keys, and 1e3 read as a number.

Aliases let a few hundred bytes expand to gigabytes (an "anchor bomb"); a config never needs them. A key given twice
would silently keep the last value. PyYAML follows YAML 1.1, where ``1e3`` (no dot) is text; configs and ``--set``
values read it as the number it looks like, as YAML 1.2 does.
"""

from __future__ import annotations

import re

import yaml

from erasekit.errors import ErasekitError
from erasekit.limits import MAX_CONFIG_BYTES, shown

_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise ErasekitError(f"line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not allowed in a "
                                f"config; write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise ErasekitError(f"line {key_node.start_mark.line + 1}: key {shown(key)!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def load(text: str, where: str):
    """The YAML document in ``text``; `ErasekitError` (one line, naming ``where``) for anything refused."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ErasekitError(f"{where}: {len(text)} characters, more than a config may hold ({MAX_CONFIG_BYTES})")
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506  (a SafeLoader subclass)
    except ErasekitError as exc:
        raise ErasekitError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ErasekitError(f"{where}: not valid YAML: {shown(first, 200)}") from None
    except (ValueError, RecursionError, OverflowError, TypeError) as exc:
        raise ErasekitError(f"{where}: not valid YAML: {type(exc).__name__}") from None
