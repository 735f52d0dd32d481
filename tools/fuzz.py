#!/usr/bin/env python3
"""Coverage-guided fuzzing of everything compeft reads from strangers, with atheris (libFuzzer).

Targets (``--target``; each input runs through every step named, and only a
:class:`compeft.CompeftError` may escape — anything else, a crash, a hang (libFuzzer ``-timeout``)
or an RSS above the limit is a finding):

``container``
    a candidate ``.cpeft`` file: open from memory, describe (``compeft inspect``), verify, decode,
    apply onto a zero base, merge with itself. Oracles: a file that passes ``verify()`` decodes;
    the same bytes decode the same way twice. Each input also runs *repaired* (header CRC, payload
    CRCs and lengths recomputed around the mutated JSON), so mutations reach the checks behind the
    checksums.
``catalog``
    a candidate ``catalog.json``: ``parse_catalog``, then what ``compeft library ls`` prints (every
    line printable: no escape sequence reaches the terminal) and ``--json``. Oracle: a catalog
    compeft accepts, written back by ``catalog_bytes``, reads back the same.
``adapter_config``
    a candidate ``adapter_config`` (JSON): ``checked_config`` against a model's module names, up to
    the point before PEFT. Oracles: every pattern handed on is a plain name or a trie that ``re``
    matches on exactly the names the original pattern matched (ours); where ``re`` finishes the
    original within 50 ms of CPU, it agrees.
``remote``
    a fake object store answering :class:`compeft.remote.RemoteReader`: the input's first 16 bytes
    script each answer (the exact range, a short body, the whole object, 503, 404, 416, a reset
    connection, a body too long; odd ``info`` sizes and ETags), the rest is the object. Open,
    describe, verify and decode through it, with and without a piece cache.
``regex``
    ``pattern NUL text``: :class:`compeft.integrations.patterns.Pattern` against ``re`` (fullmatch
    and match), whenever ``re`` finishes within 50 ms of CPU.

Seeds are in ``tools/corpus/<target>/`` (and ``spec/vectors/`` for containers). Usage (see
tools/README.md)::

    python tools/fuzz.py --target catalog --seconds 60
    python tools/fuzz.py --all --seconds 48                      # CI: the time split across targets
    python tools/fuzz.py --target container --runs 1000000 --corpus fuzz-corpus --record fuzz.jsonl
    python tools/fuzz.py --target remote --replay crash-<sha1>  # re-run inputs without atheris

It prints, per target, the inputs run, the corpus size and the findings, and exits 1 on a finding.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
CORPUS = ROOT / "tools" / "corpus"

# Decoding allocates the outputs a file declares (a 1e12-element tensor of zeros has a valid, empty
# payload): the harness decodes only files whose outputs stay small; opening and verify() run always.
MAX_DECODE_ELEMENTS = 1 << 22
# Module names the adapter_config target evaluates patterns against: a small transformer's, and a
# few long ones on which a backtracking engine would take exponential time.
MODULE_NAMES = ([""] + [f"model.layers.{i}.{part}" for i in range(4) for part in (
    "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["model", "model.layers", "model.embed_tokens", "lm_head",
    "score", "a" * 40, "a" * 39 + "b", "x.y.z" * 10])


# -- container ----------------------------------------------------------------------------------
def repair(data: bytes) -> bytes | None:
    """``data`` with the header CRC, every payload CRC, the header padding and ``file_length`` made
    consistent again, keeping the (mutated) JSON content; ``None`` when the JSON does not parse."""
    # Imported here, not at the top: surgery imports compeft.format.header, which the fuzzing child
    # must import only under atheris's instrumentation (_fuzz_child), or coverage would not see it.
    import surgery

    try:
        preamble, doc, body = surgery.split(data)
    except Exception:  # too short, or any malformed header: nothing to repair
        return None
    surgery.recrc_payloads(doc, body)
    try:
        return surgery.join(doc, body, preamble=preamble, allow_nan=True)  # deflated again if it was
    except (ValueError, RecursionError):
        return None


def exercise_expert(expert: Any, consumers: bool = True) -> None:
    """Describe, verify, decode, and (``consumers``) apply and merge an opened expert; only
    CompeftError may escape."""
    import torch

    from compeft import merge
    from compeft.applying import apply
    from compeft.dtypes import DTYPE_TO_TORCH
    from compeft.errors import CompeftError
    from compeft.report import describe

    json.dumps(describe(expert.header))  # what `compeft inspect --json` prints
    try:
        expert.verify()
        verified = True
    except CompeftError:
        verified = False
    if sum(e.numel for e in expert.header.tensors) > MAX_DECODE_ELEMENTS:
        return
    try:
        decoded = expert.state_dict()
    except CompeftError as exc:
        if verified:  # verify() promises that decoding cannot fail afterwards
            raise AssertionError(f"verify() passed but decoding failed: {exc}") from exc
        return
    if not consumers:
        return
    base = {name: torch.zeros(e.shape, dtype=DTYPE_TO_TORCH[e.dtype]) for name, e in expert.header.by_name.items()}
    try:
        apply(expert, base, scale=0.5, check_base=False)
    except CompeftError:
        pass
    for name, tensor in decoded.items():  # the same bytes decode the same way twice
        again = expert.to_dense(name)
        if not torch.equal(tensor.reshape(-1).view(torch.uint8), again.reshape(-1).view(torch.uint8)):
            raise AssertionError(f"tensor {name!r} decoded differently twice")
    for method in ("task_arithmetic", "ties"):
        try:
            merge([expert, expert], method=method, check_base=False)
        except CompeftError:
            pass


def exercise(data: bytes) -> None:
    """Open ``data`` from memory, then :func:`exercise_expert` (tests/test_fuzz_structured.py runs this)."""
    from compeft.errors import CompeftError
    from compeft.expert import CompressedExpert
    from compeft.format import BytesReader

    try:
        expert = CompressedExpert(BytesReader(data, "<fuzz>"))
    except CompeftError:
        return
    exercise_expert(expert)


def container_target(data: bytes) -> None:
    exercise(data)
    fixed = repair(data)
    if fixed is not None and fixed != data:
        exercise(fixed)


# -- catalog ------------------------------------------------------------------------------------
def catalog_target(data: bytes) -> None:
    from compeft.errors import CompeftError
    from compeft.library.catalog import catalog_bytes, parse_catalog
    from compeft.library.reading import listing

    try:
        entries = parse_catalog(data, "<fuzz>")
    except CompeftError:
        return
    for line in listing(list(entries.values())):  # what `compeft library ls` prints
        if not line.isprintable():
            raise AssertionError(f"library ls would print {line!r}")
    json.dumps([e.to_json() for e in entries.values()])  # --json (ASCII-escaped)
    if parse_catalog(catalog_bytes(entries), "<fuzz>") != entries:
        raise AssertionError("a catalog compeft accepts does not read back the same once written")


# -- regular expressions ------------------------------------------------------------------------
class _Slow(Exception):
    pass


def _interrupt(*_: Any) -> None:
    raise _Slow()


def re_within(call: Callable[[], Any], seconds: float = 0.05) -> Any:
    """``call()`` (a ``re`` match: sre checks for signals), or ``_Slow`` when it takes more than
    ``seconds`` of CPU (ITIMER_VIRTUAL: libFuzzer's own -timeout uses SIGALRM)."""
    previous = signal.signal(signal.SIGVTALRM, _interrupt)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        return call()
    except _Slow:
        return _Slow
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def compare_with_re(pattern: str, texts: list[str]) -> None:
    """Our matcher agrees with ``re`` on ``texts`` wherever ``re`` finishes in time."""
    from compeft.integrations.patterns import Budget, Pattern, PatternError

    try:
        expected = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        expected = None
    try:
        ours = Pattern(pattern)
    except PatternError:
        return  # refused: invalid, or a feature only backtracking evaluates (never handed to PEFT)
    if expected is None:
        raise AssertionError(f"{pattern!r} compiles here but not with re")
    for text in texts:
        for full in (True, False):
            want = re_within(lambda: (expected.fullmatch if full else expected.match)(text) is not None)
            if want is _Slow:
                continue
            got = (ours.fullmatch if full else ours.match)(text, Budget())
            if got != want:
                raise AssertionError(f"{'fullmatch' if full else 'match'}({pattern!r}, {text!r}): re {want}, "
                                     f"ours {got}")


def regex_target(data: bytes) -> None:
    head, _, tail = data.partition(b"\0")
    compare_with_re(head.decode("utf-8", "replace")[:96], [tail.decode("utf-8", "replace")[:12]])


# -- adapter_config -----------------------------------------------------------------------------
def adapter_config_target(data: bytes) -> None:
    from compeft.errors import CompeftError
    from compeft.integrations.patterns import Budget, Pattern
    from compeft.integrations.peft_config import NAME_FIELDS, PLAIN, SELECTORS, checked_config

    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        config = checked_config(raw, MODULE_NAMES, 4096, "<fuzz>")
    except CompeftError:
        return
    for key in SELECTORS:
        value = config.get(key)
        if isinstance(value, str) and not PLAIN.fullmatch(value):  # resolved: a trie of what matched
            original = Pattern(raw[key])
            want = {n for n in MODULE_NAMES if original.fullmatch(n, Budget())}
            got = {n for n in MODULE_NAMES if re.fullmatch(value, n)}
            if got != want:
                raise AssertionError(f"{key}: the resolved pattern matches {sorted(got)}, the original {sorted(want)}")
            compare_with_re(raw[key], [n for n in MODULE_NAMES if len(n) <= 24])
    for key in NAME_FIELDS:
        value = config.get(key)
        for entry in [value] if isinstance(value, str) else value or ():
            if not PLAIN.fullmatch(entry):
                raise AssertionError(f"{key}: {entry!r} handed to PEFT")
    for key, value in config.items():
        if key.endswith("_pattern") and isinstance(value, dict):
            for pattern in value:
                if not PLAIN.fullmatch(pattern):  # PEFT runs re.match(rf"(.*\.)?({pattern})$", name)
                    for name in MODULE_NAMES:
                        if re_within(lambda: re.match(rf"(.*\.)?({pattern})$", name)) is _Slow:
                            raise AssertionError(f"{key}: key {pattern!r} is slow under re")


# -- remote -------------------------------------------------------------------------------------
class _Status(Exception):
    """An HTTP failure as fsspec's HTTP file system raises it (with a ``status``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class FakeStore:
    """An fsspec-like file system of one object whose answers follow a script of bytes."""

    protocol = "fake"

    def __init__(self, blob: bytes, script: bytes) -> None:
        self.blob, self.script, self.calls = blob, script or b"\0", 0

    def _next(self) -> int:
        byte = self.script[self.calls % len(self.script)]
        self.calls += 1
        return byte

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        byte = self._next()
        kind, n = byte % 8, byte // 8
        start, end = start or 0, len(self.blob) if end is None else end
        if kind == 1:
            return self.blob[start:max(start, end - 1 - n)]  # a short body
        if kind == 2:
            return self.blob  # Range ignored: the whole object
        if kind == 3:
            raise _Status((503, 500, 429, 403, 404, 416, 200, 302)[n % 8])
        if kind == 4:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        if kind == 5:
            raise (OSError(errno.ECONNRESET, "reset") if n % 2 else TimeoutError("timed out"))
        if kind == 6:
            return self.blob[start:end] + bytes(n + 1)  # longer than asked
        return self.blob[start:end]

    def info(self, path: str) -> dict[str, Any]:
        byte = self._next()
        size = (len(self.blob), None, len(self.blob) + 1, -1, "12", 2 ** 70, 0, len(self.blob))[byte % 8]
        etag = (None, "", "\"abc\"", 12, ["x"], "\x1b[2J", "e" * 300, "\ud800")[byte // 32 % 8]
        return {"size": size, "ETag": etag, "name": path}


def remote_target(data: bytes) -> None:
    from compeft.errors import CompeftError
    from compeft.expert import CompressedExpert
    from compeft.remote import RemoteReader

    script, blob = data[:16], data[16:]
    use_cache = bool(script and script[0] & 0x80)
    cache = tempfile.mkdtemp(prefix="compeft-fuzz-cache-") if use_cache else None
    reader = None
    try:
        reader = RemoteReader(FakeStore(blob, script), "object", "<fuzz>", cache=cache, workers=2, retries=1,
                              backoff=0.0)
        exercise_expert(CompressedExpert(reader), consumers=False)  # (apply and merge: the container target)
    except CompeftError:
        pass
    finally:
        if reader is not None:
            reader.close()
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


# -- running ------------------------------------------------------------------------------------
TARGETS: dict[str, Callable[[bytes], None]] = {
    "container": container_target, "catalog": catalog_target, "adapter_config": adapter_config_target,
    "remote": remote_target, "regex": regex_target,
}
MAX_LEN = {"container": 65536, "catalog": 65536, "adapter_config": 16384, "remote": 65536, "regex": 256}


def seed_files(target: str) -> list[Path]:
    """The committed seeds of ``target`` (containers also every file of spec/vectors)."""
    seeds = sorted(p for p in (CORPUS / target).glob("*") if p.is_file())
    if target == "container":
        seeds += sorted(VECTORS.glob("*.cpeft")) + sorted((VECTORS / "invalid").glob("*.cpeft"))
    if target == "catalog":
        seeds += sorted((VECTORS / "library").glob("*.json")) + sorted((VECTORS / "library" / "invalid").glob("*.json"))
    return seeds


def _fuzz_child(target: str) -> None:
    """Runs under atheris (the child process): instrument compeft, then hand control to libFuzzer."""
    import atheris

    warnings.simplefilter("ignore")
    # Numba compiles the kernels from their bytecode: instrumented bytecode does not compile, so the
    # kernel modules are imported first, uninstrumented (their branches are native code anyway).
    import compeft.codec.encode_kernels  # noqa: F401
    import compeft.codec.floats  # noqa: F401
    import compeft.codec.kernels  # noqa: F401
    import compeft.codec.packed  # noqa: F401
    import compeft.codec.select_kernels  # noqa: F401
    if target == "adapter_config":
        import peft.mapping  # noqa: F401 - PEFT itself is not instrumented
    with atheris.instrument_imports(include=["compeft"]):
        import compeft.applying  # noqa: F401 - imported for instrumentation
        import compeft.integrations.patterns  # noqa: F401
        import compeft.integrations.peft_config  # noqa: F401
        import compeft.library.catalog  # noqa: F401
        import compeft.library.reading  # noqa: F401
        import compeft.merging  # noqa: F401
        import compeft.remote  # noqa: F401
        import compeft.report  # noqa: F401
    run = TARGETS[target]
    for seed in seed_files(target)[:8]:  # warm the kernels so that the first inputs do not time out
        try:
            run(seed.read_bytes())
        except Exception:  # noqa: BLE001 - a failing seed is reported by libFuzzer in a moment
            pass
    atheris.Setup(sys.argv, run)
    atheris.Fuzz()


def _stat(output: str, key: str) -> int | None:
    for line in output.splitlines():
        if line.startswith(f"stat::{key}:"):
            return int(line.split(":")[-1])
    return None


def fuzz(target: str, seconds: int, runs: int | None, corpus: Path | None, artifacts: Path, extra: list[str],
         record: Path | None) -> bool:
    """One libFuzzer run of ``target``; prints and (``record``) appends its figures; True when clean."""
    temp = None
    if corpus is None:
        corpus = Path(temp := tempfile.mkdtemp(prefix=f"compeft-fuzz-{target}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seed_files(target):
        copy = corpus / f"seed-{seed.parent.name}-{seed.name}"
        if not copy.exists():
            shutil.copyfile(seed, copy)
    found_before = set(artifacts.glob("*")) if artifacts.exists() else set()
    artifacts.mkdir(parents=True, exist_ok=True)
    limit = [f"-runs={runs}"] if runs else [f"-max_total_time={seconds}"]
    flags = [*limit, "-timeout=20", "-rss_limit_mb=3072", f"-max_len={MAX_LEN[target]}", "-print_final_stats=1",
             f"-artifact_prefix={artifacts}/{target}-", *extra, str(corpus)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tools"),
                                                         os.environ.get("PYTHONPATH", "")]))
    started = time.time()
    child = subprocess.run([sys.executable, __file__, "--child", target, *flags], env=env, capture_output=True,
                           text=True)
    output = child.stdout + child.stderr
    executed = _stat(output, "number_of_executed_units")
    findings = sorted(p.name for p in set(artifacts.glob(f"{target}-*")) - found_before)
    size = sum(1 for _ in corpus.iterdir())
    elapsed = time.time() - started
    print(f"fuzz {target}: {executed if executed is not None else '?'} inputs in {elapsed:.0f} s, corpus {size} "
          f"files, exit {child.returncode}, findings: {findings or 'none'}", flush=True)
    if record is not None:
        with open(record, "a") as log:
            log.write(json.dumps({"target": target, "executions": executed, "corpus": size, "seconds": round(elapsed),
                                  "exit": child.returncode, "findings": findings,
                                  "date": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    if child.returncode != 0:
        print(output[-6000:], file=sys.stderr)
    if temp:
        shutil.rmtree(temp, ignore_errors=True)
    return child.returncode == 0 and not findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", help="what to fuzz (repeatable)")
    parser.add_argument("--all", action="store_true", help="every target, the time split evenly")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time in all (libFuzzer -max_total_time)")
    parser.add_argument("--runs", type=int, help="executions per target instead of a time (libFuzzer -runs)")
    parser.add_argument("--corpus", type=Path, help="corpus directory (per target: DIR/TARGET), kept between runs "
                                                    "(default: a temporary one seeded from tools/corpus/)")
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="where crash-* inputs are written")
    parser.add_argument("--record", type=Path, help="append each run's figures to this JSON-lines file")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these inputs of --target once, without atheris")
    parser.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags, after --")
    args = parser.parse_args(argv)
    targets = sorted(TARGETS) if args.all else args.target or ["container"]

    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
    warnings.simplefilter("ignore")
    if args.replay:
        for path in args.replay:
            TARGETS[targets[0]](path.read_bytes())
            print(f"{path}: no finding")
        return 0
    seconds = max(1, args.seconds // len(targets))
    clean = True
    for target in targets:
        corpus = None if args.corpus is None else args.corpus / target
        clean &= fuzz(target, seconds, args.runs, corpus, args.artifacts, args.libfuzzer, args.record)
    return 0 if clean else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        target = sys.argv[2]
        del sys.argv[1:3]
        _fuzz_child(target)
    else:
        sys.exit(main())
