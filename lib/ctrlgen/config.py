"""Profiles: the same code at three scales (DESIGN.md §2).

A profile is a YAML file in ``lib/ctrlgen/profiles/`` (``smoke``, ``mini``, ``full``). Every profile
defines every key, so a profile is also the schema its overrides are checked against: an override
must name an existing key (nested keys with dots, ``ch02.toy.train_steps=200``) and give a value
of the same type. Unknown keys and wrong types are refused with a message that names the key and
the allowed ones, before anything runs.
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

import yaml

PROFILE_PACKAGE = "ctrlgen.profiles"


class ConfigError(ValueError):
    """A profile or an override that cannot be used; the message says why and what is allowed."""


def available_profiles() -> list[str]:
    """Names of the profiles shipped with the package, sorted."""
    folder = resources.files(PROFILE_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_profile(name: str) -> dict[str, Any]:
    names = available_profiles()
    if name not in names:
        raise ConfigError(f"unknown profile {name!r}; available profiles: {', '.join(names)}")
    text = resources.files(PROFILE_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {name!r} must be a mapping at the top level")
    return data


class Config(Mapping):
    """A read-only nested mapping with attribute access (``cfg.ch02.toy.train_steps``).

    ``profile_name`` and ``overrides`` record where the values came from, for result records.
    """

    def __init__(self, data: Mapping[str, Any], profile_name: str = "", overrides: Mapping[str, Any] | None = None):
        self._data = {k: Config(v) if isinstance(v, Mapping) else v for k, v in data.items()}
        self.profile_name = profile_name
        self.overrides = dict(overrides or {})

    def __getitem__(self, key: str) -> Any:
        if "." in key:
            node: Any = self
            for part in key.split("."):
                node = node[part]
            return node
        return self._data[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key in ("profile_name", "overrides"):
            raise AttributeError(key)
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"no key {key!r}; keys here: {', '.join(self._data)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        label = f" profile={self.profile_name!r}" if self.profile_name else ""
        return f"Config({self.to_dict()!r}{label})"

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict copy (for JSON records and papermill parameters)."""
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self._data.items()}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; the dotted keys overrides use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list"}.get(type(value), type(value).__name__)


def coerce(key: str, value: Any, reference: Any) -> Any:
    """Return ``value`` converted to the type of ``reference`` or raise ConfigError.

    Strings from the command line are parsed as YAML first (``3`` -> 3, ``[1, 2]`` -> list).
    An int is accepted where a float is expected; nothing else is converted silently.
    """
    if isinstance(value, str) and not isinstance(reference, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse {value!r}: {err}") from None
        if isinstance(reference, float) and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                value = float(value)
            except ValueError:
                pass
    if isinstance(reference, bool):
        ok = isinstance(value, bool)
    elif isinstance(reference, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(reference, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(reference, list):
        ok = isinstance(value, list)
    elif isinstance(reference, str):
        ok = isinstance(value, str)
    else:
        ok = type(value) is type(reference)
    if not ok:
        raise ConfigError(
            f"{key}: expected {_type_name(reference)} (like the profile's {reference!r}), got {_type_name(value)} {value!r}"
        )
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def validate_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``overrides`` (dotted key -> value) against ``base``; return them type-converted."""
    allowed = flatten(base)
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in allowed:
            if any(k.startswith(key + ".") for k in allowed):
                sub = sorted(k for k in allowed if k.startswith(key + "."))
                raise ConfigError(f"{key!r} is a section, not a value; set one of: {', '.join(sub)}")
            close = difflib.get_close_matches(key, allowed, n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown key {key!r}.{hint} Allowed keys: {', '.join(sorted(allowed))}")
        checked[key] = coerce(key, value, allowed[key])
    return checked


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}`` (values stay strings; see ``coerce``)."""
    parsed: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = value
    return parsed


def load_profile(name: str = "mini", overrides: Mapping[str, Any] | None = None) -> Config:
    """Load profile ``name`` and apply ``overrides`` (dotted keys, values of the profile's types)."""
    data = _read_profile(name)
    checked = validate_overrides(data, overrides or {})
    merged = copy.deepcopy(data)
    for key, value in checked.items():
        _set_dotted(merged, key, value)
    return Config(merged, profile_name=name, overrides=checked)
