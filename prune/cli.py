"""What every command of the toolkit shares: one-line errors, exit codes, and interruptions that leave
nothing half-written.

Exit codes: 0 done; 2 bad input (recipe, arguments, files), with one ``error:`` line naming the key or
path; 1 an I/O failure while working (a full disk, say), or a stage that failed after the run kept its
finished work, with one line; 130 interrupted (Ctrl-C, SIGINT), 143 terminated (SIGTERM, as ``timeout``
and schedulers send). Outputs are staged and caches written atomically (``prune/paths.py``), so an error
or an interruption unwinds them: nothing half-written stays behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from types import FrameType
from typing import NoReturn

from prune.memory import give_large_frees_back
from prune.processes import (
    ProcessFailure,
    launched_count,
    launched_index,
    record_failure,
    recorded_failures,
    silent_processes,
)

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line, ``error: <message>``, with exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")


def add_recipe_arguments(parser: argparse.ArgumentParser, recipe_help: str) -> None:
    """The recipe argument, and ``--schema`` which prints the recipe files' JSON Schema instead of running one."""
    parser.add_argument("recipe", nargs="?", help=recipe_help)
    parser.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of recipe files (for an editor's YAML support), then stop",
    )


def printed_schema(parser: argparse.ArgumentParser, args: argparse.Namespace, schema: Callable[[], dict]) -> bool:
    """After :func:`add_recipe_arguments`: print ``schema()`` when ``--schema`` was given (True), else require the
    recipe (a one-line error without it) and return False."""
    if args.schema:
        print(json.dumps(schema(), indent=2))
        return True
    if args.recipe is None:
        parser.error("the following arguments are required: recipe (or --schema)")
    return False


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class StageFailure(Exception):
    """A stage failed after the run had kept its finished work for a rerun to resume from; the message says which
    stage, why and where the work is kept."""


class Terminated(BaseException):
    """SIGTERM arrived; raised like KeyboardInterrupt so that staged outputs unwind."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run_command(body: Callable[[], str], user_errors: tuple[type[Exception], ...]) -> int:
    """Run a command's ``body`` (which returns its closing message) and map its end to an exit code and one
    line on stderr: ``user_errors`` exit 2, an OSError or a :class:`StageFailure` exits 1, SIGINT 130, SIGTERM 143.

    In a process other than the first of those a launcher started (``prune/processes.py``) the body's output
    (progress bars, stage names) is discarded, and so are the lines every process would print alike (bad input,
    interruptions, the closing message): the first process prints them once. A failure of its own (an OSError)
    is printed with the process's index, and an unexpected exception's traceback is not hidden."""
    give_large_frees_back()
    previous = signal.signal(signal.SIGTERM, _terminated)
    index = launched_index()
    try:
        with _discarded_output() if index else nullcontext(), _recorded_failure(index):
            message = body()
    except ProcessFailure as error:
        return _fail(EXIT_FAILED, f"error: {error}", index == 0)
    except user_errors as error:
        return _fail(EXIT_BAD_INPUT, f"error: {error}", index == 0)
    except StageFailure as error:
        return _fail(EXIT_FAILED, f"error: {error}", index == 0)
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        process = f" in process {index}" if index else ""
        return _fail(EXIT_FAILED, f"error{process}: {error.strerror or error}{where}; nothing was written", True)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted: nothing was written", index == 0)
    except Terminated:
        return _terminated_line(index)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if index == 0:
        print(message, file=sys.stderr)
    return EXIT_DONE


@contextmanager
def _recorded_failure(index: int) -> Iterator[None]:
    """In a process other than the first of a launch: an exception's one-line reason is left for the first
    process (``prune.processes.record_failure``), which names it when its wait for this one fails."""
    try:
        yield
    except ProcessFailure:
        raise
    except BaseException as error:
        if index:
            reason = {KeyboardInterrupt: "interrupted", Terminated: "terminated"}.get(type(error))
            record_failure(index, reason or f"{type(error).__name__}: {error}")
        raise


@contextmanager
def _discarded_output() -> Iterator[None]:
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), redirect_stderr(devnull):
        yield


@contextmanager
def timed(stage_seconds: dict[str, float], name: str) -> Iterator[None]:
    """Announce a stage on stderr and add its wall time (seconds) to ``stage_seconds``."""
    print(f"[{name}]", file=sys.stderr)
    start = time.perf_counter()
    yield
    stage_seconds[name] = time.perf_counter() - start


def _terminated_line(index: int) -> int:
    """SIGTERM's line and exit code. A launcher of several processes stops them all when one of them ends: the
    first process then names the one that failed (from what it recorded), or says that one may have left."""
    count = launched_count()
    if index or count == 1:
        return _fail(EXIT_TERMINATED, "terminated: nothing was written", index == 0)
    failed = recorded_failures(index)
    if failed:
        return _fail(EXIT_FAILED, f"error: {failed}; nothing was written", True)
    return _fail(
        EXIT_TERMINATED,
        "terminated: nothing was written; a launcher stops every process when one of them ends, so unless the run "
        f"was stopped, {silent_processes(index, count)}",
        True,
    )


def _fail(code: int, line: str, printed: bool) -> int:
    if printed:
        print(line, file=sys.stderr)
    return code
