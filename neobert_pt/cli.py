"""One clear line for every user error: the shared wrapper of every neobert_pt command-line entry point.

    from neobert_pt.cli import UserError, run_cli

    def _main(argv: list[str]) -> int: ...          # raise UserError (or ConfigError, CheckpointError, ...)

    def main(argv: list[str] | None = None) -> int:
        return run_cli(_main, argv, prog="python -m neobert_pt.evaluate")

A user error (bad config, data file, checkpoint, output directory, Hub failure) prints ``PROG: error: MESSAGE`` as
ONE line on stderr and exits :data:`EXIT_USER_ERROR` (2) — no traceback. ``--debug`` anywhere on the command line
(removed before the command sees it) or ``NEOBERT_DEBUG=1`` re-raises instead, with the full traceback. Anything
that is not a user error is a bug and keeps its traceback (exit 1). Exit codes: 0 success, 1 failure/bug, 2 user
error, :data:`EXIT_INTERRUPTED` (75) after a signal-triggered save (resume with ``--trainer.resume_from_checkpoint
latest``), 130 for an interrupt that did not save.

Which exceptions are user errors: :class:`UserError` and its subclasses, and every type listed in
:data:`USER_ERROR_TYPES` (``"module:Class"`` strings, resolved only if that module is already imported, so this
file imports nothing heavy). A new command adds its own types with :func:`register_user_error`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; resume to continue
EXIT_KEYBOARD = 130
DEBUG_FLAG = "--debug"
DEBUG_ENV = "NEOBERT_DEBUG"


class UserError(Exception):
    """A problem the user can fix (input, file, setting); the message is one line naming it and the fix."""


USER_ERROR_TYPES: list[str] = [
    "neobert_pt.errors:ConfigError",  # includes neobert_pt.data.errors.DataError
    "neobert_pt.train.checkpoint:CheckpointError",
    "neobert_pt.train.trainer:NonFiniteLossError",
    "neobert_pt.hub:HubError",
]


def register_user_error(*qualnames: str) -> None:
    """Add ``"module:Class"`` exception types that :func:`run_cli` reports as one line + exit 2."""
    for q in qualnames:
        if q not in USER_ERROR_TYPES:
            USER_ERROR_TYPES.append(q)


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, UserError):
        return True
    for qualname in USER_ERROR_TYPES:
        module, _, name = qualname.partition(":")
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(err, cls):
            return True
    return False


def one_line(err: BaseException) -> str:
    """The message as a single line (continuation lines joined), never empty."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def debug_enabled(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None, *, prog: str) -> int:
    """Run ``main(argv)`` and turn user errors into one stderr line + exit 2 (see the module docstring).

    Returns the exit code (``main``'s return value, 0 for None); ``SystemExit`` from argparse passes through.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_KEYBOARD
    except Exception as err:  # noqa: BLE001 - only user errors are caught; the rest re-raises below
        if debug or not is_user_error(err):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK if code is None else int(code)
