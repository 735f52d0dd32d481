"""The ``compeft`` command: parse arguments, call the public API, print. Errors are one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Sequence


def _size(n: object) -> str:
    from .report import human_size
    return human_size(n)


def _shown(value: object) -> str:
    """``value`` as text safe for a terminal (:func:`compeft.report.shown`: a hostile file's names,
    metadata and catalog fields may hold escape sequences that could rewrite the screen)."""
    from .report import shown
    return shown(value)


def _parse_meta(items: Sequence[str]) -> dict[str, str]:
    from .errors import InvalidArgumentError
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--meta expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--storage-options JSON`` merged with each ``--storage-option KEY=VALUE`` (a dotted KEY
    nests: ``client_kwargs.endpoint_url=…``; a VALUE that parses as JSON is taken as such)."""
    from .errors import InvalidArgumentError
    options: dict[str, Any] = {}
    if getattr(args, "storage_options", None):
        try:
            options = json.loads(args.storage_options)
        except ValueError as exc:
            raise InvalidArgumentError(f"--storage-options is not JSON ({exc})") from None
        if not isinstance(options, dict):
            raise InvalidArgumentError("--storage-options must be a JSON object")
    for item in getattr(args, "storage_option", None) or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--storage-option expects KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidArgumentError(f"--storage-option {key}: {part} is not an object")
        node[leaf] = value
    return options


def _open(args: argparse.Namespace, target: str, progress: bool = False) -> Any:
    import compeft
    return compeft.open(target, storage_options=_storage_options(args), cache=getattr(args, "cache", None),
                        progress=progress)


def _remote_options(p: argparse.ArgumentParser, cache: bool = True) -> None:
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="an fsspec option for URLs (repeatable; dotted keys nest, e.g. "
                        "client_kwargs.endpoint_url=http://…)")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for URLs as one JSON object")
    if cache:
        p.add_argument("--cache", metavar="DIR", help="persistent cache of bytes fetched from URLs (safe to share)")


def _alpha(text: str) -> float | str:
    """An --alpha value: a number > 0, or a rule's name (``unbiased``, ``norm``, ``l2``, ``product-unbiased``, ...)."""
    from .alpha import RULES
    if text.strip().lower() in RULES:
        return text.strip().lower()
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or one of {', '.join(RULES)}, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"alpha must be a finite number > 0, got {text!r}")
    return value


def _density(text: str) -> float:
    """A --density value in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text!r}")
    return value


def _figures(label: str, figure: Any) -> str:
    if not figure:
        return ""
    rel, cos = figure
    return f"{label} ‖τ−τ̃‖/‖τ‖ {rel:.3f}, cosine {'-' if cos is None else f'{cos:.3f}'}"


def _print_fidelity(summary: dict[str, Any]) -> None:
    """The header's data-free fidelity figures, and its warnings on stderr."""
    f = summary.get("fidelity") or {}
    parts = [p for p in (_figures("tensors:", f.get("overall")), _figures("LoRA B·A:", f.get("lora_overall"))) if p]
    if parts:
        print("fidelity without data (" + "; ".join(parts) + "); the cosine is what matters: a large error with a "
              "high cosine is a rescaled, still useful update")
    for message in summary.get("warnings", []):
        print(f"compeft: warning: {_shown(message)}", file=sys.stderr)


def cmd_compress(args: argparse.Namespace) -> int:
    import warnings

    import compeft
    from .errors import FidelityWarning
    from .report import describe
    with warnings.catch_warnings():  # printed below, once, from the header
        warnings.simplefilter("ignore", FidelityWarning)
        expert = compeft.compress(args.source, base=args.base, density=args.density, alpha=args.alpha,
                                  scope=args.scope, keep_dense=args.keep_dense or (), auto_dense=not args.compress_all,
                                  chunk_size=args.chunk_size, metadata=_parse_meta(args.meta or ()),
                                  progress=not args.quiet, format_version=args.format_version)
    expert.save(args.output, storage_options=_storage_options(args))
    summary = describe(expert.header)
    if not args.quiet:
        totals, meta = summary["totals"], summary["metadata"]
        alpha = meta.get("alpha_rule") or meta.get("alpha")
        print(f"wrote {args.output}: {len(expert)} tensors, {totals['parameters']:,} parameters, "
              f"{_size(totals['file_bytes'])}, {totals['bits_per_param']:.3f} bits/param, "
              f"{totals['ratio_vs_16bit']:.1f}x smaller than 16-bit (density {meta.get('density')}, "
              f"scope {meta.get('scope')}, alpha {alpha})")
        _print_fidelity(summary)
    else:
        _print_fidelity({"warnings": summary["warnings"]})
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    # Header only: neither torch nor numba is imported here.
    from .format import read_header
    from .remote import open_reader
    from .report import describe, inspect_table
    summary = describe(read_header(open_reader(args.file, _storage_options(args), args.cache)))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(inspect_table(summary, args.file))
    _print_fidelity(summary)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    expert = _open(args, args.file, progress=not args.quiet)
    expert.verify()
    if not args.quiet:
        print(f"{args.file}: OK ({len(expert)} tensors, every checksum and structure verified)")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from .lora import export_lora
    expert = _open(args, args.file, progress=not args.quiet)
    targets = None if args.target_modules is None else args.target_modules.split(",")
    result = export_lora(expert, args.output, rank=args.rank, target_modules=targets, strict=args.strict,
                         progress=not args.quiet)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
        return 0
    if result.left_out:
        print(f"compeft: warning: left out {len(result.left_out)} tensors that cannot be a LoRA (biases, norms, "
              f"embeddings; {100 * result.left_out_energy:.2f} % of ‖τ̃‖²): --json lists them, --strict refuses",
              file=sys.stderr)
    if not args.quiet:
        worst = min(result.kept, key=result.kept.__getitem__)
        print(f"wrote {result.path}: {len(result.kept)} modules at rank {result.rank}; ‖ΔW‖² kept: "
              f"min {100 * result.kept[worst]:.1f} % ({worst})")
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    import compeft
    expert = _open(args, args.file, progress=not args.quiet)
    out = compeft.decompress(expert, args.output, base=args.base, check_base=not args.force, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge_run import merge_command
    out = merge_command(args, _storage_options(args))
    if args.dry_run or not args.quiet:
        print(out)
    return 0


def cmd_library_build(args: argparse.Namespace) -> int:
    import compeft
    report = compeft.build_library(args.sources, args.output, base=args.base, density=args.density, alpha=args.alpha,
                                   scope=args.scope, keep_dense=args.keep_dense or (), auto_dense=not args.compress_all,
                                   chunk_size=args.chunk_size, storage_options=_storage_options(args),
                                   scheduler=args.scheduler, workers=args.workers, progress=not args.quiet)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for failure in report.failed:
            print(f"failed: {_shown(failure.name)}: {_shown(failure.reason)}", file=sys.stderr)
        if not args.quiet:
            print(f"{report.catalog}: built {len(report.built)}, already built {len(report.skipped)}, failed "
                  f"{len(report.failed)} in {report.seconds:.1f} s on {report.workers} workers "
                  f"({_size(report.bytes_read)} read, {_size(report.bytes_written)} written)")
    return 0 if report.ok else 1


def cmd_library_ls(args: argparse.Namespace) -> int:
    import compeft
    library = compeft.open_library(args.library, storage_options=_storage_options(args), cache=args.cache)
    rows = [library.entries[n] for n in library]
    if args.json:  # (ASCII-escaped JSON: nothing in it reaches the terminal raw)
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return 0
    from .library.reading import listing
    print("\n".join(listing(rows)))
    return 0


def cmd_library_verify(args: argparse.Namespace) -> int:
    import compeft
    library = compeft.open_library(args.library, storage_options=_storage_options(args), cache=args.cache)
    names = args.names or list(library)
    library.verify(names, progress=not args.quiet)
    if not args.quiet:
        print(f"{args.library}: OK ({len(names)} experts match the catalog's SHA-256 and verify)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(quiet=args.quiet, density=args.density)
    return 0


def _add_encoding_options(p: argparse.ArgumentParser, meta: bool = True) -> None:
    """The options ``compress``, ``tune-alpha`` and ``library build`` share (a library's experts carry
    the build's own metadata, so it takes no ``--meta``)."""
    p.add_argument("--scope", choices=("tensor", "global"), default="tensor",
                   help="each tensor its own threshold and magnitude (tensor, default) or one over all tensors "
                        "(global, the paper's reference)")
    p.add_argument("--keep-dense", action="append", metavar="PATTERN",
                   help="glob of tensor names stored verbatim (repeatable), e.g. '*classifier*'")
    p.add_argument("--compress-all", action="store_true",
                   help="PEFT adapters: compress every floating tensor, also DoRA magnitudes, modules_to_save heads "
                        "and other weights that are kept dense by default")
    p.add_argument("--chunk-size", type=int, default=16384, help="kept entries per chunk (parallel decode unit)")
    if meta:
        p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="user metadata (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true")


def _numbers(text: str, what: str, allow_rules: bool = False) -> list[Any]:
    from .alpha import RULES
    from .errors import InvalidArgumentError
    out: list[Any] = []
    for item in text.split(","):
        item = item.strip()
        if allow_rules and item.lower() in RULES:
            out.append(item.lower())
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise InvalidArgumentError(f"{what} expects comma-separated numbers, got {text!r}") from None
    return out


def cmd_tune_alpha(args: argparse.Namespace) -> int:
    import compeft
    from .tuning import score_command, score_function
    evaluate = score_command(args.score_command) if args.score_command else score_function(args.score_function)
    alphas = None if args.alphas is None else _numbers(args.alphas, "--alphas", allow_rules=True)
    result = compeft.tune_alpha(args.source, evaluate, base=args.base, densities=_numbers(args.densities, "--densities"),
                                alphas=alphas, scope=args.scope, keep_dense=args.keep_dense or (),
                                auto_dense=not args.compress_all, chunk_size=args.chunk_size,
                                metadata=_parse_meta(args.meta or ()), progress=not args.quiet)
    result.expert.save(args.output)
    if args.json:
        print(json.dumps(result.expert.metadata["tuning"], indent=2))
    elif not args.quiet:
        for density, alpha, value in result.scores:
            mark = "  <- chosen" if (density, alpha) == (result.density, result.alpha) else ""
            print(f"density {density:<6g} alpha {alpha!s:<5} score {value:.6g}{mark}")
        print(f"wrote {args.output}: density {result.density:g}, alpha {result.alpha}, score {result.score:.6g}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``compeft compress: error: …``; ``-h`` shows the usage)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="compeft", description="Compress fine-tuning residuals (ComPEFT).")
    parser.add_argument("--version", action="version", version=f"compeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compress", help="compress a PEFT adapter dir, a fine-tune (with --base) into a .cpeft")
    p.add_argument("source", help="PEFT adapter directory, or fine-tuned model directory / .safetensors file")
    p.add_argument("-o", "--output", required=True, help="the .cpeft file or URL to write (atomic)")
    p.add_argument("--base", help="base model directory or .safetensors file (for full fine-tunes)")
    p.add_argument("--density", type=_density, default=0.1, help="fraction k of entries kept, in (0, 1] (default 0.1)")
    p.add_argument("--alpha", type=_alpha, default=None,
                   help="magnitude of the kept entries: a rule (default product-unbiased in tensor scope, unbiased in "
                        "global scope; also norm, l2, product-norm, product-l2) or a number: ±alpha·std(τ). The "
                        "paper's reference mode: --scope global --alpha 1")
    _add_encoding_options(p)
    p.add_argument("--format-version", type=int, choices=(1, 2), default=2,
                   help="container format: 2 (default) or 1 (read by compeft releases before format 2 too)")
    _remote_options(p, cache=False)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("tune-alpha", help="sweep alpha (and density), score each candidate with your script, keep the "
                                          "best; the sweep is recorded in the output's metadata")
    p.add_argument("source", help="PEFT adapter directory, or fine-tuned model directory / .safetensors file")
    p.add_argument("-o", "--output", required=True, help="the .cpeft file to write (the best candidate)")
    p.add_argument("--base", help="base model directory or .safetensors file (for full fine-tunes)")
    p.add_argument("--densities", default="0.1", help="comma-separated densities to try (default 0.1)")
    p.add_argument("--alphas", default=None,
                   help="comma-separated alphas, rules allowed (unbiased, norm, l2, product-unbiased, ...; default the paper's "
                        "0.5,1,2,3,4,5,6,8,10 and the default rule)")
    score = p.add_mutually_exclusive_group(required=True)
    score.add_argument("--score-command", metavar="CMD",
                       help="run for each candidate ('{expert}' is replaced by the candidate's .cpeft path, else "
                            "the path is appended); the last line of its output is the score, higher is better")
    score.add_argument("--score-function", metavar="FILE.py:NAME",
                       help="a Python function (in a file or an importable module: MODULE:NAME) taking the candidate "
                            "CompressedExpert and returning its score, higher is better")
    p.add_argument("--json", action="store_true", help="print every score and the choice as JSON")
    _add_encoding_options(p)
    p.set_defaults(func=cmd_tune_alpha)

    p = sub.add_parser("inspect", help="show tensors, shapes, nnz, bits/param and ratios (reads the header only)")
    p.add_argument("file", help="a .cpeft file or URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _remote_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every checksum and the structure of every payload")
    p.add_argument("file", help="a .cpeft file or URL")
    _remote_options(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("decompress", help="restore a PEFT adapter dir, a dense task vector, or base + τ̃")
    p.add_argument("file", help="a .cpeft file or URL")
    p.add_argument("-o", "--output", required=True,
                   help="adapter directory, .safetensors task vector, or (with --base) model directory")
    p.add_argument("--base", help="base model directory or .safetensors file: write base + τ̃")
    p.add_argument("--force", action="store_true", help="apply even if the base fingerprint differs")
    _remote_options(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("export-lora", help="write any expert as a PEFT LoRA adapter of a chosen rank (truncated SVD)")
    p.add_argument("file", help="a .cpeft file or URL: a full fine-tune, a merge or a LoRA adapter")
    p.add_argument("-o", "--output", required=True, help="the LoRA adapter directory to write")
    p.add_argument("--rank", type=int, required=True, help="r of every module")
    p.add_argument("--target-modules", metavar="NAMES", help="comma-separated: only modules ending with these")
    p.add_argument("--strict", action="store_true", help="refuse tensors that cannot be a LoRA instead of leaving "
                                                         "them out")
    p.add_argument("--json", action="store_true", help="print every module's share of ‖ΔW‖² kept as JSON")
    _remote_options(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export_lora)

    p = sub.add_parser("merge", help="merge compressed experts from their streams (flags, or a mergekit --config)")
    p.add_argument("experts", nargs="*", help=".cpeft files or URLs, all on the same base (with --library: names)")
    p.add_argument("--config", metavar="YAML", help="a mergekit merge config instead of experts and flags (docs/merging.md)")
    p.add_argument("--dry-run", action="store_true", help="with --config: check the config and the experts' headers")
    p.add_argument("--union", action="store_true", help="experts may hold different tensors (lacking one counts as 0)")
    p.add_argument("--library", metavar="URL", help="take the experts by name from this library (its catalog)")
    p.add_argument("-o", "--output",
                   help="a .safetensors merged task vector, a .cpeft (re-compressed), or with a base a model directory")
    p.add_argument("--method", choices=("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"),
                   help="default task_arithmetic; ties is PEFT's rule (mergekit's: --config)")
    p.add_argument("--weights", help="comma-separated, one per expert (default 1 each)")
    p.add_argument("--scale", type=float, default=1.0, help="λ, the factor on the merged task vector")
    p.add_argument("--lambda", dest="scale", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--no-normalize", action="store_true", help="linear: do not divide the weights by their sum")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dare_*: drop probability p in [0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE/DELLA drops and re-trim ties (recorded)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA experts merged as products ΔW = B·A per module; "
                   "-o DIR: a LoRA adapter of rank R (truncated SVD), -o x.safetensors: the merged ΔW dense")
    p.add_argument("--base", help="base model directory or .safetensors file: write base + merged τ")
    p.add_argument("--density", type=_density, help=".cpeft output: density of the re-compression (default: "
                   "the first expert's)")
    p.add_argument("--alpha", type=_alpha, default=None,
                   help=".cpeft output: alpha of the re-compression (default: compress's default rule)")
    p.add_argument("--force", action="store_true", help="merge experts built on different bases")
    _remote_options(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)

    library = sub.add_parser("library", help="expert libraries: build many experts on Dask, list, verify")
    lsub = library.add_subparsers(dest="library_command", required=True, parser_class=_Parser)
    p = lsub.add_parser("build", help="compress many adapters (or fine-tunes) in parallel into a library with a catalog")
    p.add_argument("sources", nargs="+", help="adapter directories or fine-tunes, paths or URLs; globs expand "
                                              "(quote them), e.g. 's3://raw/adapters/*/'")
    output = p.add_argument("-o", "--output", "--out", required=True,
                            help="the library root: a directory or URL prefix")
    output.option_strings = ["-o", "--output"]  # --out (the earlier spelling) is still accepted, not shown
    p.add_argument("--base", help="base model (path readable by the workers, or URL) of full fine-tunes")
    p.add_argument("--density", type=_density, default=0.1, help="fraction k of entries kept, in (0, 1] (default 0.1)")
    p.add_argument("--alpha", type=_alpha, default=None,
                   help="a rule (default product-unbiased in tensor scope, unbiased in global scope) or a number (as "
                        "compress)")
    engine = p.add_mutually_exclusive_group()
    engine.add_argument("--scheduler", metavar="ADDRESS", help="a Dask scheduler (tcp://host:8786); default: a local "
                                                               "cluster on this machine")
    engine.add_argument("--workers", type=int, help="worker processes of the local cluster (default: one per core)")
    p.add_argument("--json", action="store_true", help="print the build report as JSON")
    _add_encoding_options(p, meta=False)
    _remote_options(p, cache=False)
    p.set_defaults(func=cmd_library_build)

    p = lsub.add_parser("ls", help="list a library's experts: names, base, sizes, density, alpha (one request)")
    p.add_argument("library", help="library root (or its catalog.json), path or URL")
    p.add_argument("--json", action="store_true", help="the catalog entries as JSON")
    _remote_options(p)
    p.set_defaults(func=cmd_library_ls)

    p = lsub.add_parser("verify", help="check experts against the catalog's SHA-256 and their own checksums")
    p.add_argument("library", help="library root (or its catalog.json), path or URL")
    p.add_argument("names", nargs="*", help="experts to check (default all)")
    _remote_options(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_library_verify)

    p = sub.add_parser("demo", help="fine-tune a small model in-process, compress, save, reopen, restore, report")
    p.add_argument("--density", type=_density, default=0.1)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from .errors import CompeftError
    try:
        return int(args.func(args))
    except CompeftError as exc:  # one line, whatever a hostile file put into the message
        print(f"compeft: error: {_shown(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an unwritable output directory
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"compeft: error: {_shown(where)}{_shown(exc.strerror or exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compeft: interrupted", file=sys.stderr)
        return 130


# Commands after which the process ends with os._exit, stdout and stderr flushed: they start no
# subprocess, leave nothing to exit handlers, and fsync every file they write before returning. The
# interpreter's teardown (torch's and Numba's destructors) was 0.5-0.8 s of a ~3 s decompress (case 2p).
QUICK_EXIT = frozenset({cmd_compress, cmd_verify, cmd_decompress, cmd_export_lora, cmd_merge})


def entry_point() -> Any:
    args = build_parser().parse_args()
    code = run(args)
    if args.func in QUICK_EXIT:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
