"""Tuning α: :func:`tune_alpha` sweeps α (and density) scored by the caller, and the scoring hooks of
``compeft tune-alpha`` (a command run per candidate, or a Python function).

Both hooks turn into the ``evaluate(expert) -> float`` callable that :func:`tune_alpha` takes.
A failing hook raises :class:`~compeft.errors.InvalidArgumentError` naming the command or function,
so the CLI prints one line.
"""

from __future__ import annotations

import atexit
import dataclasses
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
from typing import Callable, Mapping, Sequence

from .alpha import DEFAULT_SCOPE
from .codec import golomb
from .encode import Encoded, PathLike, TensorSource, check_arguments, default_alpha, encode_source
from .errors import InvalidArgumentError
from .expert import CompressedExpert
from .sources import resolve_source

PLACEHOLDER = "{expert}"
PAPER_ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # the grid of Yadav et al. (2023)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What :func:`tune_alpha` chose: the expert (its metadata records the sweep), its α and
    density, its score, and every point scored as ``(density, alpha, score)`` in sweep order."""

    expert: CompressedExpert
    density: float
    alpha: float | str
    score: float
    scores: tuple[tuple[float, float | str, float], ...]


def tune_alpha(source: TensorSource, evaluate: Callable[[CompressedExpert], float], *,
               base: PathLike | None = None, densities: Sequence[float] = (0.1,),
               alphas: Sequence[float | str] | None = None, scope: str = DEFAULT_SCOPE, keep_dense: Sequence[str] = (),
               auto_dense: bool = True, chunk_size: int = golomb.DEFAULT_CHUNK_SIZE,
               metadata: Mapping[str, str] | None = None, progress: bool = False) -> TuneResult:
    """Sweep α (and density) and keep the expert that ``evaluate`` scores highest.

    Each density is selected and entropy-coded once; every α of the grid only rewrites the
    header's scales, so a sweep costs about one :func:`compress` per density plus the evaluations.

    Parameters
    ----------
    source, base, scope, keep_dense, auto_dense, chunk_size, metadata, progress
        As for :func:`compress`.
    evaluate
        Called with each candidate expert (in memory); returns a score, higher is better (e.g. a
        validation accuracy). Its exceptions propagate.
    densities
        The densities k to try.
    alphas
        The α grid (default the paper's 0.5, 1, 2, 3, 4, 5, 6, 8, 10, then the default rule of the
        scope); rules (``"unbiased"``, ``"norm"``, ``"l2"``, ``"product-unbiased"``, ...) may be included.

    Returns
    -------
    TuneResult
        The best point (the first in sweep order among equal scores: densities in the order given,
        then α). Its expert's metadata holds ``tuning``: the grid, every score and the choice.

    Examples
    --------
    >>> import torch, compeft
    >>> tau = {"w": torch.randn(64, 64)}
    >>> def score(expert):  # minus the reconstruction error
    ...     return -float((expert.to_dense("w") - tau["w"]).norm())
    >>> result = compeft.tune_alpha(tau, score, densities=[0.1, 0.5])
    >>> result.density, result.alpha
    (0.5, 1.0)
    """
    if not callable(evaluate):
        raise InvalidArgumentError("evaluate must be a callable taking an expert and returning a score")
    densities = list(densities)
    # the default grid also holds the default rule, so tuning never picks worse than no tuning
    alphas = [*PAPER_ALPHAS, default_alpha(scope)] if alphas is None else list(alphas)
    if not densities or not alphas:
        raise InvalidArgumentError("tune_alpha needs at least one density and one alpha")
    for density in densities:
        check_arguments(density, alphas[0], scope, chunk_size)
    for alpha in alphas:
        check_arguments(densities[0], alpha, scope, chunk_size)
    src = resolve_source(source, base)
    scored: list[tuple[float, float | str, float]] = []
    best: tuple[float, float, float | str, Encoded] | None = None
    for density in densities:
        encoded = encode_source(src, density=density, scope=scope, keep_dense=keep_dense, auto_dense=auto_dense,
                                chunk_size=chunk_size, metadata=metadata, progress=progress)
        for alpha in alphas:
            score = evaluate(encoded.build(alpha))
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise InvalidArgumentError(f"evaluate returned {score!r} for density {density}, alpha {alpha}; "
                                           "it must return a finite number")
            scored.append((float(density), alpha if isinstance(alpha, str) else float(alpha), float(score)))
            if best is None or score > best[0]:
                best = (float(score), float(density), alpha, encoded)
    assert best is not None
    score, density, alpha, encoded = best
    record = {"densities": [float(d) for d in densities], "alphas": [a if isinstance(a, str) else float(a) for a in alphas],
              "scores": [list(point) for point in scored], "chosen": {"density": density, "alpha": alpha,
                                                                       "score": score}}
    expert = encoded.build(alpha, {"tuning": record})
    return TuneResult(expert, density, alpha if isinstance(alpha, str) else float(alpha), score, tuple(scored))


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
