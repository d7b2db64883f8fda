"""How a job process ends: exit status 0, or one line on stderr naming the problem.

- a bad flag, YAML file, setting or missing input (:class:`ConfigError`, found before Ray, torch or
  faiss are imported): status 2;
- an expected failure (bad corpus, damaged index, missing model, an output folder of another run,
  bad qrels or run): status 1;
- anything else is a bug or an infrastructure failure and keeps its traceback (status 1);
- a job that ran and found nothing to do may ask for its own status: ``build_index --unchanged-status 3``
  exits 3 when the corpus snapshot gives the version CURRENT already names (a nightly scheduler can tell
  "nothing new" from "published").

``--debug`` (or ``PIPELINES_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

CONFIG_ERROR_STATUS = 2
EXPECTED_ERROR_STATUS = 1


def expected_errors() -> tuple[type[BaseException], ...]:
    """The failures users cause and can fix, each with a message naming the file, row or setting."""
    from pipelines.documents import CorpusError
    from pipelines.evaluation import EvaluationError
    from pipelines.index_building import MemoryBudgetError
    from pipelines.index_store import IndexValidationError
    from pipelines.models import DeviceUnavailableError, ModelNotFoundError
    from pipelines.retrieval import OutputMismatchError

    return (CorpusError, IndexValidationError, ModelNotFoundError, OutputMismatchError, EvaluationError, MemoryBudgetError, DeviceUnavailableError)


def run_job(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run a job's ``main(argv)``; returns the process exit status (see the module docstring)."""
    from pipelines.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PIPELINES_DEBUG") == "1"
    try:
        result = main(argv)
    except ConfigError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_STATUS
    except Exception as error:
        debug = debug or os.environ.get("PIPELINES_DEBUG") == "1"
        if debug or not isinstance(error, expected_errors()):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXPECTED_ERROR_STATUS
    return int(result.get("exit_status", 0)) if isinstance(result, dict) else 0
