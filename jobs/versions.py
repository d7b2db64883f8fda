"""Manage an index root's versions: list, show, roll back, pin, prune.

    python -m jobs.versions list     --index URL [--json]
    python -m jobs.versions show     --index URL [--version ID] [--json]
    python -m jobs.versions rollback --index URL --to ID [--json]
    python -m jobs.versions pin      --index URL --version ID [--note TEXT] [--json]
    python -m jobs.versions unpin    --index URL --version ID [--json]
    python -m jobs.versions prune    --index URL --keep N [--older-than 7d] [--grace 1d] [--dry-run] [--json]

Commands that write (rollback, pin, unpin, prune) hold the root's writer lease (pipelines.index_lease), so they
never interleave with a build. URL is any fsspec index root (a local folder, s3://..., memory://...). Every command prints a table, or
one JSON document with --json. Rules of prune (CURRENT, pinned and recently superseded versions are never
removed; shared files go only when no remaining version references them): see pipelines/versions.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from pipelines.cli import run_job
from pipelines.config import ConfigError, parse_config

INDEX_HELP = "index root URL (local folder, s3://, memory://...)"
JSON_HELP = "print one JSON document instead of tables"


def _require_index(config) -> None:
    if not config.index:
        raise ValueError("--index is required")


@dataclass
class ListConfig:
    """Settings of jobs.versions list."""

    index: str = field(default="", metadata={"help": INDEX_HELP})
    json: bool = field(default=False, metadata={"help": JSON_HELP})

    def validate(self) -> None:
        _require_index(self)


@dataclass
class ShowConfig:
    """Settings of jobs.versions show."""

    index: str = field(default="", metadata={"help": INDEX_HELP})
    version: str = field(default="", metadata={"help": "version id (default: CURRENT)"})
    json: bool = field(default=False, metadata={"help": JSON_HELP})

    def validate(self) -> None:
        _require_index(self)


@dataclass
class RollbackConfig:
    """Settings of jobs.versions rollback."""

    index: str = field(default="", metadata={"help": INDEX_HELP})
    to: str = field(default="", metadata={"help": "the finished version to make CURRENT (validated first: manifest and every checksum)"})
    json: bool = field(default=False, metadata={"help": JSON_HELP})

    def validate(self) -> None:
        _require_index(self)
        if not self.to:
            raise ValueError("--to is required")


@dataclass
class PinConfig:
    """Settings of jobs.versions pin / unpin."""

    index: str = field(default="", metadata={"help": INDEX_HELP})
    version: str = field(default="", metadata={"help": "version id"})
    note: str = field(default="", metadata={"help": "why it is pinned (kept in the pin record; pin only)"})
    json: bool = field(default=False, metadata={"help": JSON_HELP})

    def validate(self) -> None:
        _require_index(self)
        if not self.version:
            raise ValueError("--version is required")


@dataclass
class PruneConfig:
    """Settings of jobs.versions prune."""

    index: str = field(default="", metadata={"help": INDEX_HELP})
    keep: int = field(default=0, metadata={"help": "finished versions to keep, newest first (CURRENT, pinned and recently superseded ones are kept besides)"})
    older_than: str = field(default="", metadata={"help": "only remove versions created longer ago than this (7d, 12h, 30m; '' = any age)"})
    grace: str = field(default="1d", metadata={"help": "keep versions superseded, unfinished folders written and shared files written less than this ago"})
    dry_run: bool = field(default=False, metadata={"help": "print the plan, remove nothing"})
    json: bool = field(default=False, metadata={"help": JSON_HELP})

    def validate(self) -> None:
        from pipelines.versions import parse_duration

        _require_index(self)
        if self.keep < 1:
            raise ValueError(f"--keep {self.keep}: give the number of versions to keep (at least 1)")
        for name in ("older_than", "grace"):
            value = getattr(self, name)
            if value:
                try:
                    parse_duration(value)
                except ValueError as error:
                    raise ValueError(f"--{name.replace('_', '-')} {error}") from None


COMMANDS = {"list": ListConfig, "show": ShowConfig, "rollback": RollbackConfig, "pin": PinConfig, "unpin": PinConfig, "prune": PruneConfig}


def _print(value: Any, as_json: bool, text: str) -> None:
    print(json.dumps(value, indent=2, default=str) if as_json else text, flush=True)


def main(argv: list[str] | None = None) -> Any:
    from pipelines import versions

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        if not argv:
            raise ConfigError(f"command line: name a command: {', '.join(COMMANDS)} (see --help)")
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise ConfigError(f"command line: unknown command {command!r}: use one of {', '.join(COMMANDS)}")
    config = parse_config(COMMANDS[command], rest, description=f"jobs.versions {command}\n\n{__doc__}")
    root = config.index
    if command == "list":
        finished, unfinished = versions.scan_versions(root)
        result = {"finished": [info.row() for info in finished], "unfinished": [info.row() for info in unfinished]}
        _print(result, config.json, versions.list_table(finished, unfinished))
    elif command == "show":
        result = versions.version_summary(root, config.version or None)
        _print(result, config.json, versions.show_text(result))
    elif command == "rollback":
        with versions.writer_lease(root, "jobs.versions rollback") as lease:
            result = versions.rollback(root, config.to, lease=lease)
        text = (f"CURRENT -> {config.to} (was {result['previous']}); every file checked" if result["moved"]
                else f"CURRENT already is {config.to}; every file checked")
        _print(result, config.json, text)
    elif command == "pin":
        with versions.writer_lease(root, "jobs.versions pin"):
            result = versions.pin(root, config.version, config.note)
        _print(result, config.json, f"pinned {config.version} ({result['pinned_by']}, {result['pinned_at']})")
    elif command == "unpin":
        with versions.writer_lease(root, "jobs.versions unpin"):
            was = versions.unpin(root, config.version)
        result = {"version_id": config.version, "was_pinned": was}
        _print(result, config.json, f"unpinned {config.version}" if was else f"{config.version} was not pinned")
    else:
        if config.dry_run:
            plan = versions.prune(root, config.keep, config.older_than or None, config.grace, dry_run=True)
        else:  # under the writer lease: no build can start reusing a shared file between the plan and the removal
            with versions.writer_lease(root, "jobs.versions prune"):
                plan = versions.prune(root, config.keep, config.older_than or None, config.grace)
        result = plan.to_dict()
        _print(result, config.json, versions.prune_table(plan))
    return result


if __name__ == "__main__":
    sys.exit(run_job(main, sys.argv[1:]))
