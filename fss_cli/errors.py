"""What a failed command shows: one line saying what went wrong, never a traceback.

The root command group catches every exception a command raises and prints it as
``error: <message>`` on stderr with exit code 1. Errors the pipeline raises on purpose (bad
input, a refused store, a busy workspace, ...) already carry a message meant for people; any
other exception is shown with its type. ``FSS_DEBUG=1`` re-raises instead, for the traceback.
Log records printed to the terminal lose their tracebacks the same way (the message stays), in
the command's process and in the workers of the local Dask cluster it starts; log records sent
to the Prefect server keep them.
"""

from __future__ import annotations

import json
import logging
import os

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

DEBUG_ENV = "FSS_DEBUG"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# Exceptions whose message is written for the person at the terminal (matched by class name
# along the MRO, so this module imports none of the heavy libraries that define them).
_MEANT_FOR_USERS = frozenset({
    "ConfigError", "StoreValidationError", "ManifestError", "DatasetLayoutError", "ImageReadError",
    "WorkspaceLockedError", "CheckpointMismatchError", "UnsafeCheckpointError", "PredictInputError",
    "FileNotFoundError", "PermissionError", "NotADirectoryError", "IsADirectoryError", "ValueError",
    "RuntimeError",
})


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def one_line(exc: BaseException) -> str:
    """``exc`` as a single line: its message with whitespace collapsed, typed when unexpected."""
    message = " ".join(str(exc).split())
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _MEANT_FOR_USERS and message:
        return message
    return f"unexpected {type(exc).__name__}: {message or repr(exc)} (set {DEBUG_ENV}=1 to see the traceback)"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM/SIGHUP in a run), with what the person should know about it."""


class OneLineErrors(TyperGroup):
    """The root group: any exception from a command becomes ``error: ...`` and exit code 1."""

    def invoke(self, ctx):
        if not debugging():
            hide_tracebacks_in_terminal_logs()
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # exits, aborts and usage errors: Typer reports them
            raise
        except KeyboardInterrupt as exc:
            detail = f": {exc}" if isinstance(exc, Interrupted) and str(exc) else ""
            typer.secho(f"error: interrupted{detail}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if debugging():
                raise
            typer.secho(f"error: {one_line(exc)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_FAILED) from None


class _NoTraceback(logging.Formatter):
    """Wraps a handler's formatter: the record's message without its traceback or stack."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def hide_tracebacks_in_terminal_logs() -> None:
    """Strip tracebacks from log lines printed to the terminal (files and servers keep them)."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if terminal and not isinstance(handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter))


def quiet_local_workers() -> None:
    """Have the Dask workers this process starts strip tracebacks from their terminal log lines
    too (a worker preload, through the environment they inherit); a preload set by the user wins."""
    os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PRELOAD", json.dumps([__name__]))


def dask_setup(worker=None) -> None:
    """Dask worker preload hook: Prefect's logging set up now, its terminal lines without tracebacks."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    hide_tracebacks_in_terminal_logs()
