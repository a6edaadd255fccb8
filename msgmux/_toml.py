# -*- test-case-name: tests.test_config -*-
"""
Typed, path-aware reading of a parsed TOML document.

The configuration loader in L{msgmux.config} asks a L{Section} for keys of a
given type; every failure becomes a L{ConfigError} that names the file and the
dotted key (C{control.links[1].down[0].topic}), which is what an operator needs
to fix a config without reading our source.  Keys nobody asked for are
reported too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """
    A configuration problem, located by file and key.

    @ivar path: the configuration file.
    @ivar key: the dotted key, or C{""} for the file as a whole.
    @ivar problem: what is wrong, in words.
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key:
            return f"{self.path}: {self.key}: {self.problem}"
        return f"{self.path}: {self.problem}"


_MISSING = object()

_TYPE_NAMES = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "a table",
}


class Section:
    """
    One TOML table being read, remembering which keys were consumed.

    @ivar path: the file the table came from.
    @ivar prefix: the dotted key of this table (C{""} at top level).
    """

    def __init__(self, path: str, prefix: str, table: dict[str, Any]) -> None:
        self.path = path
        self.prefix = prefix
        self._table = table
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        """
        @param name: a key of this table.
        @return: its full dotted name, for error messages.
        """
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        """
        @param name: a key of this table (or C{""} for the table itself).
        @param problem: what is wrong with it.
        @return: an error naming the file and the key.
        """
        return ConfigError(self.path, self.key(name) if name else self.prefix, problem)

    def has(self, name: str) -> bool:
        """
        @param name: a key of this table.
        @return: whether the key is present.
        """
        return name in self._table

    def names(self) -> list[str]:
        """@return: the keys present in this table, sorted."""
        return sorted(self._table)

    def get(
        self,
        name: str,
        kind: type[T],
        default: Any = _MISSING,
        check: Callable[[T], str | None] | None = None,
    ) -> T:
        """
        Read one scalar or array key.

        @param name: the key.
        @param kind: the Python type TOML must have produced; C{float} also
            accepts integers, C{int} refuses booleans.
        @param default: the value when the key is absent; without it the key
            is required.
        @param check: an extra check returning a problem description, or
            L{None} when the value is fine.
        @return: the value.
        @raise ConfigError: when the key is missing, mistyped or fails
            C{check}.
        """
        self._seen.add(name)
        value = self._table.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(name, "is required")
            return default  # type: ignore[no-any-return]
        if not _is_kind(value, kind):
            raise self.error(name, f"must be {_TYPE_NAMES.get(kind, kind.__name__)}, not {value!r}")
        if kind is float:
            value = float(value)
        if check is not None:
            problem = check(value)
            if problem:
                raise self.error(name, problem)
        return value  # type: ignore[no-any-return]

    def strings(self, name: str, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """
        Read an array of non-empty strings.

        @param name: the key.
        @param default: the value when absent; without it the key is required.
        @return: the strings, as a tuple.
        """
        values = self.get(name, list, default=_MISSING if default is None else list(default))
        for index, item in enumerate(values):
            if not isinstance(item, str) or not item:
                raise self.error(f"{name}[{index}]", f"must be a non-empty string, not {item!r}")
        return tuple(values)

    def table(self, name: str, required: bool = False) -> Section:
        """
        Read a sub-table.

        @param name: the key.
        @param required: whether absence is an error; an absent optional
            table reads as empty.
        @return: a L{Section} for it.
        """
        value = self.get(name, dict, default=_MISSING if required else {})
        return Section(self.path, self.key(name), value)

    def tables(self, name: str) -> list[Section]:
        """
        Read an array of tables (C{[[name]]} or an array of inline tables).

        @param name: the key.
        @return: one L{Section} per element; empty when the key is absent.
        """
        values = self.get(name, list, default=[])
        sections = []
        for index, item in enumerate(values):
            item_key = f"{self.key(name)}[{index}]"
            if not isinstance(item, dict):
                raise ConfigError(self.path, item_key, f"must be a table, not {item!r}")
            sections.append(Section(self.path, item_key, item))
        return sections

    def finish(self) -> None:
        """
        Refuse keys that were never read: they are typos or unsupported
        options, and ignoring them would hide the operator's intent.

        @raise ConfigError: naming the first unknown key.
        """
        unknown = sorted(set(self._table) - self._seen)
        if unknown:
            raise self.error(unknown[0], "is not a known option")


def _is_kind(value: object, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)
