"""The command line run in the test's own process, its output captured (no subprocess)."""
from __future__ import annotations

import contextlib
import io


def cli(*args) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``selfclassifier ARGS...``."""
    from selfclassifier_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """stderr without the log lines (INFO/WARNING name: ...)."""
    return [ln for ln in err.splitlines() if not ln.startswith(("INFO ", "WARNING ", "DEBUG "))]
