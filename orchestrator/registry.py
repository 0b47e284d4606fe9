"""One registry type for every kind of thing a config names: methods, backbones, datasets, search algorithms.

A registry maps names to entries (classes or builders). Unknown names are config errors that list
what is available, under the config key that named them; a name registered twice by different entries
is a programming error. Registries that fill themselves by importing modules (the built-in methods)
pass a ``load`` callable that runs before the first look-up.
"""

from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

from orchestrator.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str, load: Optional[Callable[[], None]] = None):
        self.kind, self.key = kind, key  # "backbone", "model.backbone": for error messages
        self._load = load
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; returns the entry, so ``add`` serves as a decorator's body."""
        if not name:
            raise TypeError(f"a {self.kind} needs a non-empty name")
        if name in self._entries and self._entries[name] is not entry:
            raise TypeError(f"{self.kind} name {name!r} is already registered by {self._entries[name]!r}")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, key: Optional[str] = None) -> T:
        """The entry ``name``; a ConfigError under ``key`` (default: the registry's) lists the others."""
        self._ensure_loaded()
        if name not in self._entries:
            raise ConfigError(key or self.key, f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def _ensure_loaded(self) -> None:
        if self._load is not None:
            self._load()
