"""Expert libraries (compeft/library/, spec/LIBRARY.md): builds on a real Dask cluster of worker
processes, the catalog, resuming, bad inputs, a worker killed mid-job, S3 and HTTP."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import save_file

import compeft
from compeft.errors import CatalogError, InvalidArgumentError, UnsupportedVersionError
from compeft.library import CATALOG_NAME, catalog_bytes, parse_catalog

sys.path.insert(0, str(Path(__file__).parent))
from servers import moto_server, object_server  # noqa: E402

distributed = pytest.importorskip("distributed")

SETTINGS = {"density": 0.1, "alpha": 2.0, "scope": "tensor"}


def write_adapter(directory: Path, seed: int, *, layers: int = 2, width: int = 256, rank: int = 8) -> dict[str, torch.Tensor]:
    """A LoRA adapter directory (bf16 safetensors + config); returns its tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        prefix = f"base_model.model.layers.{i}.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=g).to(torch.bfloat16)
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(width, rank, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "base_model_name_or_path": "tiny-base", "r": rank, "lora_alpha": 16,
              "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def adapters(root: Path, names: list[str], **shape: int) -> Path:
    for i, name in enumerate(names):
        write_adapter(root / name, seed=i, **shape)
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A real local Dask cluster: two worker processes (each with a nanny that restarts it)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address="127.0.0.1:0") as cluster, distributed.Client(cluster) as client:
        yield client


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def same_tensors(a: compeft.CompressedExpert, b: compeft.CompressedExpert) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].view(torch.int16), sb[k].view(torch.int16)) for k in sa)


# ---------------------------------------------------------------------------------------------
# building


def test_build_matches_compress_and_catalog_lists_every_field(tmp_path: Path, cluster: Any) -> None:
    src = adapters(tmp_path / "src", ["math", "code", "chat"])
    out = tmp_path / "lib"
    report = compeft.build_library(f"{src}/*/", out, scheduler=cluster, **SETTINGS)
    assert report.ok and [e.name for e in report.built] == ["chat", "code", "math"] and not report.skipped
    assert files_in(out) == [CATALOG_NAME, "chat.cpeft", "code.cpeft", "math.cpeft"]
    catalog = parse_catalog((out / CATALOG_NAME).read_bytes(), "catalog")
    import hashlib
    for name in ("math", "code", "chat"):
        entry = catalog[name]
        data = (out / f"{name}.cpeft").read_bytes()
        assert entry.file == f"{name}.cpeft" and entry.size == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert (entry.density, entry.alpha, entry.scope, entry.source) == (0.1, 2.0, "tensor", "peft")
        assert entry.base_model == "tiny-base" and entry.peft_type == "LORA" and entry.base_fingerprint is None
        assert entry.parameters == 2 * 2 * 8 * 256 and entry.tensors == 4
        assert entry.origin == str(src / name)
        # the same codec as compress(): identical tensors
        assert same_tensors(compeft.open(out / f"{name}.cpeft"), compeft.compress(src / name, **SETTINGS))
    assert report.bytes_written == sum(e.size for e in report.built)
    assert report.parameters == 3 * entry.parameters


def test_embedded_local_cluster_and_progress_options(tmp_path: Path) -> None:
    src = adapters(tmp_path / "src", ["a", "b", "c", "d"])
    report = compeft.build_library([str(src / n) for n in "abcd"], tmp_path / "lib", workers=2, **SETTINGS)
    assert report.workers == 2 and len(report.built) == 4 and report.ok
    assert sorted(compeft.open_library(tmp_path / "lib")) == ["a", "b", "c", "d"]


def test_rerun_skips_verified_outputs_and_rebuilds_what_changed(tmp_path: Path, cluster: Any) -> None:
    src = adapters(tmp_path / "src", ["a", "b", "c"])
    out = tmp_path / "lib"
    compeft.build_library(f"{src}/*/", out, scheduler=cluster, **SETTINGS)
    before = {n: os.stat(out / f"{n}.cpeft").st_ino for n in "abc"}

    again = compeft.build_library(f"{src}/*/", out, scheduler=cluster, **SETTINGS)
    assert not again.built and [e.name for e in again.skipped] == ["a", "b", "c"]
    assert {n: os.stat(out / f"{n}.cpeft").st_ino for n in "abc"} == before  # not rewritten

    write_adapter(src / "b", seed=99)  # a retrained source
    data = bytearray((out / "c.cpeft").read_bytes())
    data[-9] ^= 0x10  # a corrupt output (a payload byte)
    (out / "c.cpeft").write_bytes(bytes(data))
    third = compeft.build_library(f"{src}/*/", out, scheduler=cluster, **SETTINGS)
    assert [e.name for e in third.built] == ["b", "c"] and [e.name for e in third.skipped] == ["a"]
    compeft.open_library(out).verify()

    changed = compeft.build_library(f"{src}/*/", out, scheduler=cluster, **{**SETTINGS, "density": 0.2})
    assert len(changed.built) == 3  # other settings: everything is rebuilt
    assert {e.density for e in compeft.open_library(out).entries.values()} == {0.2}


def test_bad_inputs_are_reported_and_the_rest_is_built(tmp_path: Path, cluster: Any) -> None:
    src = adapters(tmp_path / "src", ["good1", "good2"])
    (src / "no_weights").mkdir()
    (src / "no_weights" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    write_adapter(src / "torn", seed=5)
    weights = src / "torn" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated safetensors file
    (src / "not_an_adapter").mkdir()
    write_adapter(src / "-bad-name", seed=6)
    report = compeft.build_library(f"{src}/*/", tmp_path / "lib", scheduler=cluster, **SETTINGS)
    assert [e.name for e in report.built] == ["good1", "good2"]
    reasons = {f.name: f.reason for f in report.failed}
    assert set(reasons) == {"-bad-name", "no_weights", "torn", "not_an_adapter"}
    assert "no adapter weights" in reasons["no_weights"]
    assert "safetensors" in reasons["torn"]
    assert "adapter_config.json" in reasons["not_an_adapter"]
    assert "may hold only" in reasons["-bad-name"]
    assert sorted(compeft.open_library(tmp_path / "lib")) == ["good1", "good2"]


def test_argument_errors(tmp_path: Path) -> None:
    src = adapters(tmp_path / "a", ["x"])
    adapters(tmp_path / "b", ["x"])
    with pytest.raises(InvalidArgumentError, match="two sources give the expert name 'x'"):
        compeft.build_library([str(src / "x"), str(tmp_path / "b" / "x")], tmp_path / "lib")
    with pytest.raises(InvalidArgumentError, match="matches nothing"):
        compeft.build_library(f"{tmp_path}/nothing-*/", tmp_path / "lib")
    with pytest.raises(InvalidArgumentError, match="density"):
        compeft.build_library(f"{src}/*/", tmp_path / "lib", density=2.0)
    with pytest.raises(InvalidArgumentError, match="workers"):
        compeft.build_library(f"{src}/*/", tmp_path / "lib", workers=0)
    assert not (tmp_path / "lib" / CATALOG_NAME).exists()


def test_new_experts_join_an_existing_catalog(tmp_path: Path, cluster: Any) -> None:
    adapters(tmp_path / "first", ["a"])
    adapters(tmp_path / "second", ["b"])
    compeft.build_library(f"{tmp_path}/first/*/", tmp_path / "lib", scheduler=cluster, **SETTINGS)
    compeft.build_library(f"{tmp_path}/second/*/", tmp_path / "lib", scheduler=cluster, **SETTINGS)
    assert sorted(compeft.open_library(tmp_path / "lib")) == ["a", "b"]


def test_full_finetunes_against_a_base(tmp_path: Path, cluster: Any) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"l1.weight": torch.randn(64, 64, generator=g), "l2.weight": torch.randn(64, 64, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "tunes").mkdir()
    for i, name in enumerate(["math", "code"]):
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for k, v in base.items()}
        save_file(tuned, str(tmp_path / "tunes" / f"{name}.safetensors"))
    report = compeft.build_library(f"{tmp_path}/tunes/*.safetensors", tmp_path / "lib", base=str(tmp_path / "base"),
                                   scheduler=cluster, **SETTINGS)
    assert report.ok and [e.name for e in report.built] == ["code", "math"]
    library = compeft.open_library(tmp_path / "lib")
    fingerprints = {e.base_fingerprint for e in library.entries.values()}
    assert len(fingerprints) == 1 and None not in fingerprints
    assert same_tensors(library["math"], compeft.compress(tmp_path / "tunes" / "math.safetensors",
                                                          base=tmp_path / "base", **SETTINGS))
    merged = compeft.merge(library.select(["math", "code"]), method="ties")
    assert set(merged) == set(base)


# ---------------------------------------------------------------------------------------------
# a worker killed mid-job


def test_worker_killed_mid_job_library_complete_and_verified(tmp_path: Path) -> None:
    names = [f"e{i:02d}" for i in range(8)]
    src = adapters(tmp_path / "src", names, layers=8, width=2048, rank=16)  # ~0.5M params: long enough tasks
    out = tmp_path / "lib"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address="127.0.0.1:0") as cluster, distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
        result: dict[str, Any] = {}
        builder = threading.Thread(target=lambda: result.update(report=compeft.build_library(
            f"{src}/*/", out, scheduler=client, **SETTINGS)))
        builder.start()
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            busy = {w: keys for w, keys in client.processing().items() if keys}
            done = sum(1 for n in names if (out / f"{n}.cpeft").exists())
            if busy and done >= 1:  # one expert written, others under way: kill a busy worker
                victim = next(iter(busy))
                os.kill(pids[victim], signal.SIGKILL)
            time.sleep(0.01)
        builder.join(timeout=240)
        assert victim is not None, "no task was seen running"
        assert not builder.is_alive()
    report = result["report"]
    assert report.ok, report.failed
    assert sorted(e.name for e in (*report.built, *report.skipped)) == names
    assert files_in(out) == sorted([CATALOG_NAME, *(f"{n}.cpeft" for n in names)])  # no partial or temp file
    library = compeft.open_library(out)
    library.verify()
    for n in names[:2]:
        assert same_tensors(library[n], compeft.compress(src / n, **SETTINGS))


# ---------------------------------------------------------------------------------------------
# object stores and HTTP


def test_s3_sources_and_library_through_moto(tmp_path: Path, cluster: Any) -> None:
    import fsspec
    src = adapters(tmp_path / "src", ["math", "code", "chat"])
    with moto_server() as options:
        fs = fsspec.filesystem("s3", **options)
        for bucket in ("raw", "bucket"):
            fs.call_s3("create_bucket", Bucket=bucket)
        for name in ("math", "code", "chat"):
            for f in (src / name).iterdir():
                fs.put_file(str(f), f"raw/adapters/{name}/{f.name}")
        report = compeft.build_library("s3://raw/adapters/*/", "s3://bucket/lib/", storage_options=options,
                                       scheduler=cluster, **SETTINGS)
        assert report.ok and len(report.built) == 3, report.failed
        assert sorted(fs.ls("bucket/lib")) == sorted(["bucket/lib/catalog.json", "bucket/lib/chat.cpeft",
                                                      "bucket/lib/code.cpeft", "bucket/lib/math.cpeft"])
        library = compeft.open_library("s3://bucket/lib/", storage_options=options)
        assert library.entries["math"].origin == "s3://raw/adapters/math"
        library.verify()
        assert same_tensors(library["code"], compeft.compress(src / "code", **SETTINGS))
        again = compeft.build_library("s3://raw/adapters/*/", "s3://bucket/lib/", storage_options=options,
                                      scheduler=cluster, **SETTINGS)
        assert len(again.skipped) == 3 and not again.built


def test_catalog_is_one_request_and_experts_open_by_name_over_http(tmp_path: Path, cluster: Any) -> None:
    src = adapters(tmp_path / "src", ["math", "code"])
    compeft.build_library(f"{src}/*/", tmp_path / "lib", scheduler=cluster, **SETTINGS)
    with object_server() as server:
        for f in (tmp_path / "lib").iterdir():
            server.put(f"lib/{f.name}", f.read_bytes())
        server.reset_counts()
        library = compeft.open_library(server.url("lib/"))
        assert server.requests == 1 and sorted(library) == ["code", "math"]
        expert = library["math"]
        assert same_tensors(expert, compeft.open(tmp_path / "lib" / "math.cpeft"))
        library.verify(["code"])


# ---------------------------------------------------------------------------------------------
# the catalog's rules (spec/LIBRARY.md)


def _catalog(tmp_path: Path, cluster: Any) -> Path:
    adapters(tmp_path / "src", ["a", "b"])
    compeft.build_library(f"{tmp_path}/src/*/", tmp_path / "lib", scheduler=cluster, **SETTINGS)
    return tmp_path / "lib"


def _edit(lib: Path, change: Any) -> None:
    doc = json.loads((lib / CATALOG_NAME).read_text())
    change(doc)
    (lib / CATALOG_NAME).write_text(json.dumps(doc))


@pytest.mark.parametrize("change, error, message", [
    (lambda d: d.update(format_version=2), UnsupportedVersionError, "format_version 2"),
    (lambda d: d.update(format="other"), CatalogError, "compeft-library"),
    (lambda d: d["experts"].append(dict(d["experts"][0])), CatalogError, "listed twice"),
    (lambda d: d["experts"][0].update(file="../a.cpeft"), CatalogError, "is not 'a.cpeft'"),
    (lambda d: d["experts"][0].update(name="../a", file="../a.cpeft"), CatalogError, "may hold only"),
    (lambda d: d["experts"][0].update(size="1"), CatalogError, "size has the wrong type"),
    (lambda d: d["experts"][0].pop("sha256"), CatalogError, "lacks sha256"),
    (lambda d: d["experts"][0].update(sha256="0" * 63), CatalogError, "sha256"),
    (lambda d: d.pop("experts"), CatalogError, "experts"),
])
def test_malformed_catalogs_are_refused(tmp_path: Path, cluster: Any, change: Any, error: type, message: str) -> None:
    lib = _catalog(tmp_path, cluster)
    _edit(lib, change)
    with pytest.raises(error, match=message) as info:
        compeft.open_library(lib)
    assert "catalog.json" in str(info.value)


def test_duplicate_keys_and_oversized_catalogs_are_refused(tmp_path: Path, cluster: Any) -> None:
    lib = _catalog(tmp_path, cluster)
    text = (lib / CATALOG_NAME).read_text().replace('"format": ', '"format": "x", "format": ', 1)
    with pytest.raises(CatalogError, match="duplicate key"):
        parse_catalog(text.encode(), "catalog.json")
    import compeft.library as library_module
    with pytest.raises(CatalogError, match="larger than the limit"):
        parse_catalog(b" " * (library_module.MAX_CATALOG_BYTES + 1), "catalog.json")


def test_a_replaced_or_corrupt_expert_is_caught(tmp_path: Path, cluster: Any) -> None:
    lib = _catalog(tmp_path, cluster)
    (lib / "a.cpeft").write_bytes(compeft.compress({"w": torch.randn(4, 4)}).to_bytes())  # replaced by another file
    library = compeft.open_library(lib)
    with pytest.raises(CatalogError, match="does not match its catalog entry"):
        library["a"]
    data = bytearray((lib / "b.cpeft").read_bytes())
    data[-9] ^= 1
    (lib / "b.cpeft").write_bytes(bytes(data))
    with pytest.raises(CatalogError, match="SHA-256"):
        library.verify(["b"])
    (lib / "b.cpeft").unlink()
    with pytest.raises(CatalogError, match="missing"):
        library.verify(["b"])
    with pytest.raises(InvalidArgumentError, match="no expert named 'zzz'"):
        library["zzz"]
    with pytest.raises(CatalogError, match="no catalog here"):
        compeft.open_library(tmp_path / "src")


def test_catalog_bytes_round_trip(tmp_path: Path, cluster: Any) -> None:
    lib = _catalog(tmp_path, cluster)
    data = (lib / CATALOG_NAME).read_bytes()
    assert catalog_bytes(parse_catalog(data, "catalog.json")) == data


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_build_ls_verify_merge(tmp_path: Path, cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from compeft.cli import main
    src = adapters(tmp_path / "src", ["math", "code", "chat"])
    (src / "broken").mkdir()
    address = cluster.scheduler.address
    lib = str(tmp_path / "lib")
    code = main(["library", "build", f"{src}/*/", "--out", lib, "--scope", "tensor", "--density", "0.1",
                 "--scheduler", address, "-q"])
    captured = capsys.readouterr()
    assert code == 1 and "failed: broken:" in captured.err and "Traceback" not in captured.err

    assert main(["library", "ls", lib]) == 0
    listing = capsys.readouterr().out
    assert "math" in listing and "tiny-base" in listing and "3 experts" in listing
    assert main(["library", "ls", lib, "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["chat", "code", "math"]
    assert main(["library", "verify", lib, "-q"]) == 0

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--library", lib, "math", "code", "chat", "--method", "ties", "-o", str(merged), "-q"]) == 0
    from safetensors.torch import load_file
    reference = compeft.merge([compeft.open(Path(lib) / f"{n}.cpeft") for n in ("math", "code", "chat")],
                              method="ties")
    assert all(torch.equal(load_file(merged)[k], reference[k]) for k in reference)

    assert main(["merge", "--library", lib, "math", "nope", "-o", str(merged)]) == 2
    assert "no expert named 'nope'" in capsys.readouterr().err
    assert main(["library", "ls", str(src)]) == 2
    assert "no catalog here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# spec/vectors/library (built by tools/make_vectors.py; the encoder direction is its --check)

LIBRARY_VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "library"


def _invalid_catalog_rows() -> list[tuple[str, str]]:
    text = (LIBRARY_VECTORS / "README.md").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().strip("`") for c in line.strip().strip("|").split(" | ")]
            rows.append((cells[0], cells[1]))
    return rows


def test_library_vector_decodes_exactly() -> None:
    from safetensors.torch import load_file
    import hashlib
    library = compeft.open_library(LIBRARY_VECTORS)
    assert sorted(library) == ["code", "math"]
    for name in library:
        entry = library.entries[name]
        data = (LIBRARY_VECTORS / entry.file).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert (entry.density, entry.alpha, entry.scope, entry.source, entry.peft_type) == (0.25, 2.0, "tensor", "peft",
                                                                                             "LORA")
        assert library[name].metadata["build"]["origin"] == entry.origin == f"s3://example-raw/adapters/{name}"
        expected = load_file(LIBRARY_VECTORS / f"{name}.expected.safetensors")
        got = library[name].state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k].view(torch.int16), expected[k].view(torch.int16)) for k in got)
    library.verify()
    assert catalog_bytes(library.entries) == (LIBRARY_VECTORS / CATALOG_NAME).read_bytes()


def test_invalid_library_vectors_table_matches_files() -> None:
    listed = sorted(f for f, _ in _invalid_catalog_rows())
    assert listed == sorted(p.name for p in (LIBRARY_VECTORS / "invalid").iterdir()) and len(listed) >= 9


@pytest.mark.parametrize("file, error", _invalid_catalog_rows())
def test_invalid_library_vector_raises_exactly(file: str, error: str) -> None:
    import compeft.errors as errors
    path = LIBRARY_VECTORS / "invalid" / file
    with pytest.raises(errors.CompeftError) as info:
        compeft.open_library(path)
    assert type(info.value) is getattr(errors, error)
    assert str(path) in str(info.value)
