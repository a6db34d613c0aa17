"""How every command reports and ends: the JSON line, the memory line, progress bars, skipped inputs, and
one exit status per kind of outcome.

Exit status: 0 done; 1 ran but produced nothing (every image skipped, the loss diverged: `NoUsableImages`,
a result with nothing in it, or `CommandError(..., EXIT_EMPTY)`); 2 usage and load errors (bad input: a
ValueError, CheckpointError included, or an OSError such as a missing file). An error is one line
`error: ...` on stderr, without a traceback; argparse reports bad options itself, with the usage, also as 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Callable, Iterator

from tqdm import tqdm

from ..data import NoUsableImages

EXIT_OK = 0
EXIT_EMPTY = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure the command reports as one `error: ...` line, ending with exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def reported_as(what: str) -> Iterator[None]:
    """Bad input met inside (ValueError, OSError) becomes a `CommandError` that says `what` failed."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise CommandError(f"{what}: {error}") from None


def print_error(error) -> None:
    """`error: ...` on stderr, on one line (a library message may span several)."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)


def print_json(result: dict) -> None:
    """The machine-readable result: one JSON object on the last line of stdout."""
    print(json.dumps(result, default=str), flush=True)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def memory_line(memory: dict) -> str:
    """The readable form of `encode.peak_memory()`."""
    return (f"peak memory: {format_bytes(memory['peak_rss_bytes'])} resident, "
            f"{format_bytes(memory['peak_mlx_bytes'])} MLX")


class _TqdmHandler(logging.Handler):
    """Log records as plain lines on stderr, written around any progress bar on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a failing handler must not break the program
            self.handleError(record)


@contextlib.contextmanager
def _library_messages() -> Iterator[None]:
    """Shows what the library logs (a skipped image: `skipping PATH: reason`) while the command runs."""
    logger = logging.getLogger("mlx_aim")
    handler = _TqdmHandler(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def _download_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's download bars off while the command runs, with --no-progress."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def run_command(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`body(args)`, a command's work on its parsed options, with its progress settings and the library's
    messages shown; returns its exit status, or that of the error it raised (see the module docstring),
    printed as one line."""
    with _download_bars(not getattr(args, "no_progress", False)), _library_messages():
        try:
            return body(args)
        except CommandError as error:
            print_error(error)
            return error.code
        except NoUsableImages as error:
            print_error(error)
            return EXIT_EMPTY
        except (ValueError, OSError) as error:  # CheckpointError is a ValueError
            print_error(error)
            return EXIT_USAGE
