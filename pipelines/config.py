"""Job configuration: one dataclass per job, filled from defaults, then a YAML file, then flags.

Every leaf field of a (possibly nested) config dataclass becomes a command-line flag:
a top-level field ``rerank_depth`` is ``--rerank-depth``, a nested field ``embedding.batch_size``
is ``--embedding.batch-size``; a class attribute ``FLAG_ALIASES`` ({"--top-k": "search.top_k"})
adds short names. The YAML file uses the same nesting. Unknown keys are errors,
so a typo in a config file is never silently ignored.

Example:
    >>> @dataclasses.dataclass
    ... class Example:
    ...     name: str = "a"
    ...     size: int = 1
    >>> parse_config(Example, ["--size", "3"]).size
    3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A configuration file or flag is invalid; the message names the key and the source."""


def _unwrap_optional(field_type: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, types.UnionType):
        arguments = [a for a in typing.get_args(field_type) if a is not type(None)]
        if len(arguments) == 1:
            return arguments[0], True
    return field_type, False


def _convert(raw: Any, field_type: Any, key: str, source: str) -> Any:
    """Convert a YAML value or a command-line string to the field's declared type."""
    inner, optional = _unwrap_optional(field_type)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' may not be empty")
    try:
        if inner is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if inner in (int, float, str):
            if inner is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError(f"not an integer: {raw!r}")
            return inner(raw)
        origin = typing.get_origin(inner)
        if origin in (list, tuple):
            (element_type,) = typing.get_args(inner)[:1] or (str,)
            items = raw if isinstance(raw, (list, tuple)) else [p for p in str(raw).split(",") if p.strip()]
            converted = [_convert(item.strip() if isinstance(item, str) else item, element_type, key, source) for item in items]
            return converted if origin is list else tuple(converted)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: '{key}' = {raw!r} is not a valid {getattr(inner, '__name__', inner)} ({error})") from None
    return raw


def _leaf_fields(config_class: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """All leaf fields as (dotted name, type, field), descending into nested dataclasses."""
    hints = typing.get_type_hints(config_class)
    leaves = []
    for field in dataclasses.fields(config_class):
        field_type = hints[field.name]
        dotted = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(field_type):
            leaves.extend(_leaf_fields(field_type, dotted + "."))
        else:
            leaves.append((dotted, field_type, field))
    return leaves


def _apply(config: Any, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set nested values (a mapping shaped like the dataclass) on ``config`` in place."""
    hints = typing.get_type_hints(type(config))
    names = {field.name for field in dataclasses.fields(config)}
    for key, value in values.items():
        attribute = key.replace("-", "_")
        dotted = f"{prefix}{attribute}"
        if attribute not in names:
            raise ConfigError(f"{source}: unknown setting '{dotted}' (known: {', '.join(sorted(names))})")
        field_type = hints[attribute]
        if dataclasses.is_dataclass(field_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping of settings")
            _apply(getattr(config, attribute), value, source, dotted + ".")
        else:
            setattr(config, attribute, _convert(value, field_type, dotted, source))


def load_yaml_config(config: Any, path: str | Path) -> None:
    """Apply the settings of a YAML file to ``config`` in place."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror if isinstance(error, OSError) else error})") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    _apply(config, values, str(path))


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a one-line :class:`ConfigError` instead of usage text and exit."""

    def error(self, message: str):
        raise ConfigError(f"command line: {message} (see --help)")


def build_argument_parser(config_class: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` plus one flag per leaf field of ``config_class``.

    The description keeps its line breaks (examples stay on their own lines); each flag shows its default once.
    """
    parser = _ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with settings (flags override it)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    aliases = getattr(config_class, "FLAG_ALIASES", {})
    defaults = config_class()
    for dotted, field_type, field in _leaf_fields(config_class):
        default = defaults
        for part in dotted.split("."):
            default = getattr(default, part)
        flags = ["--" + dotted.replace("_", "-")] + [alias for alias, target in aliases.items() if target == dotted]
        help_text = field.metadata.get("help", "")
        inner, _ = _unwrap_optional(field_type)
        if typing.get_origin(inner) is list:
            parser.add_argument(*flags, dest=dotted, action="append", default=None, help=f"{help_text} (repeatable) [default: {default}]")
        elif inner is bool:  # --flag alone means true; --flag false (or off, no, 0) too
            parser.add_argument(*flags, dest=dotted, default=None, nargs="?", const="true", metavar="BOOL", help=f"{help_text} [default: {str(default).lower()}]")
        else:
            parser.add_argument(*flags, dest=dotted, default=None, help=f"{help_text} [default: {default}]")
    return parser


def parse_config(config_class: type[ConfigT], argv: list[str] | None, description: str = "") -> ConfigT:
    """Defaults, then ``--config FILE.yaml``, then flags: the effective configuration."""
    parser = build_argument_parser(config_class, description)
    arguments = parser.parse_args(argv)
    if arguments.debug:
        os.environ["PIPELINES_DEBUG"] = "1"
    config = config_class()
    if arguments.config:
        load_yaml_config(config, arguments.config)
    overrides: dict[str, Any] = {}
    for dotted, _, _ in _leaf_fields(config_class):
        value = getattr(arguments, dotted)
        if value is None:
            continue
        if isinstance(value, list) and len(value) == 1 and "," in value[0]:
            value = value[0]
        target = overrides
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    _apply(config, overrides, "command line")
    storage_config = getattr(config, "storage", None)
    if storage_config is not None:  # before the rest: validating inputs opens their filesystems
        from pipelines import storage

        validate_config(storage_config, "storage.")
        storage.configure(storage_config.parsed())
    validate_config(config)
    return config


def validate_config(config: Any, prefix: str = "") -> None:
    """Run ``validate()`` of every nested config dataclass (innermost first), reporting failures as ConfigError.

    Validation happens before any job work (and before Ray, torch or faiss are imported), so a bad
    setting or a missing input costs the user a second, not a cluster start.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            validate_config(value, f"{prefix}{field.name}.")
    validate = getattr(config, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as error:
            message = str(error)
            if prefix and message.startswith("--"):
                message = "--" + prefix.replace("_", "-") + message[2:]
            raise ConfigError(message) from None


def require_at_least(config: Any, minimums: dict[str, float]) -> None:
    """ValueError naming the flag when a numeric setting is below its minimum (e.g. batch sizes, top-k >= 1)."""
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The configuration as plain nested dicts (for printing, manifests and cache keys), storage secrets hidden.

    A :class:`~pipelines.storage.StorageConfig` appears with its options parsed, each secret-looking value
    (key, secret, token, ...) as ``***``."""
    import copy

    from pipelines import storage

    if isinstance(config, storage.StorageConfig):
        return {"options": storage.redacted(config.parsed())}
    return {field.name: config_to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
            for field in dataclasses.fields(config) for value in (getattr(config, field.name),)}


def format_config(config: Any) -> str:
    """Human-readable effective configuration, printed at job start."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False).rstrip()
