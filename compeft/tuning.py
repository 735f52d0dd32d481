"""Scoring hooks for ``compeft tune-alpha``: a command run per candidate, or a Python function.

Both turn into the ``evaluate(expert) -> float`` callable that :func:`compeft.tune_alpha` takes.
A failing hook raises :class:`~compeft.errors.InvalidArgumentError` naming the command or function,
so the CLI prints one line.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import InvalidArgumentError
from .expert import CompressedExpert

PLACEHOLDER = "{expert}"


def score_command(command: str) -> Callable[[CompressedExpert], float]:
    """``evaluate`` that saves each candidate to a temporary ``.cpeft`` file and runs ``command``
    (split like a shell would, but run without one) with ``{expert}`` replaced by that path, or the
    path appended when there is no placeholder. The path is also in ``$COMPEFT_EXPERT``. The last
    non-empty line of the command's standard output is the score."""
    argv = shlex.split(command)
    if not argv:
        raise InvalidArgumentError("--score-command is empty")
    workdir = tempfile.mkdtemp(prefix="compeft-tune-")
    atexit.register(shutil.rmtree, workdir, True)
    candidate = os.path.join(workdir, "candidate.cpeft")

    def evaluate(expert: CompressedExpert) -> float:
        expert.save(candidate)
        args = [a.replace(PLACEHOLDER, candidate) for a in argv]
        if not any(PLACEHOLDER in a for a in argv):
            args.append(candidate)
        try:
            done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "COMPEFT_EXPERT": candidate})
        except OSError as exc:
            raise InvalidArgumentError(f"cannot run score command {argv[0]!r} ({exc.strerror or exc})") from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
            raise InvalidArgumentError(f"score command {command!r} exited with status {done.returncode}"
                                       + (f": {tail}" if tail else ""))
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        return _number(lines[-1] if lines else "", f"score command {command!r}")

    return evaluate


def score_function(spec: str) -> Callable[[CompressedExpert], float]:
    """``evaluate`` from ``path/to/file.py:name`` or ``package.module:name``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise InvalidArgumentError(f"--score-function expects FILE.py:NAME or MODULE:NAME, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InvalidArgumentError("no such file", path)
        loader_spec = importlib.util.spec_from_file_location(f"compeft_score_{abs(hash(path.resolve()))}", path)
        if loader_spec is None or loader_spec.loader is None:
            raise InvalidArgumentError("cannot load this file as Python", path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.resolve().parent))  # the script may import its neighbours
        try:
            loader_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # the user's file: report it in one line, whatever it raised
            raise InvalidArgumentError(f"running this file failed ({type(exc).__name__}: {exc})", path) from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise InvalidArgumentError(f"cannot import {where!r} ({exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InvalidArgumentError(f"{where} has no function {name!r}")

    def evaluate(expert: CompressedExpert) -> float:
        try:
            value = function(expert)
        except (Exception, SystemExit) as exc:
            raise InvalidArgumentError(f"score function {spec!r} raised {type(exc).__name__}: {exc}") from None
        return _number(value, f"score function {spec!r}")

    return evaluate


def _number(value: object, what: str) -> float:
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} gave {str(value)[:80]!r}, not a number") from None
    if not math.isfinite(score):
        raise InvalidArgumentError(f"{what} gave {score}, not a finite number")
    return score
