"""What the command-line entry points share: user errors in one line with exit code 2, tracebacks for bugs."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn a ValueError (the project's type for bad input: config, paths, data) into `prog: error: ...` on
    stderr and exit code 2; any other exception is a bug and keeps its traceback."""
    try:
        yield
    except ValueError as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"{os.path.basename(prog)}: error: {message}\n")
        sys.exit(2)


__all__ = ["user_errors"]
