"""Name -> class tables for the pluggable parts (strategies, probes), filled by a decorator."""

from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict[str, type], kind: str) -> Callable[[str], Callable[[type], type]]:
    """A class decorator factory: ``@register(name)`` adds the class to ``table`` under ``name``;
    a name registered twice is a programming error."""

    def register(name: str) -> Callable[[type], type]:
        def wrap(cls: type) -> type:
            if name in table:
                raise RuntimeError(f"{kind} '{name}' registered twice")
            table[name] = cls
            return cls

        return wrap

    return register
