"""One expert of a library, built on a Dask worker: plain data in and out.

A task finds its source's files, skips the expert when a verified output with the same ``build``
record (source identity and settings) is already there, else encodes the source (fetched to a
temporary directory when it is remote) and writes ``NAME.cpeft`` atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..encode import encode_source
from ..errors import CompeftError, SourceError
from ..expert import CompressedExpert
from ..format import BytesReader
from ..remote import attempt, is_url, local_path, object_identity, redact, resolve, write
from ..sources import resolve_source
from .catalog import EXPERT_SUFFIX, CatalogEntry, fetch_object

# Files of a source that encoding reads: a PEFT adapter's config and weights; a full fine-tune's
# safetensors shards, their index and its small JSON files (config.json, ...).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _source_files(fs: Any, path: str, full: bool) -> tuple[list[dict[str, Any]], bool]:
    """The files encoding reads, with their fsspec info (size and validators), and whether the
    source is a directory (else a single ``.safetensors`` file)."""
    if not attempt(lambda: fs.isdir(path), "listing the source", path):
        if full and path.endswith(".safetensors"):
            return [attempt(lambda: fs.info(path), "reading the source", path)], False
        raise SourceError("not a directory" + (" or a .safetensors file" if full else " (a PEFT adapter directory)"),
                          path)
    listing = attempt(lambda: fs.ls(path, detail=True), "listing the source", path)
    files = [i for i in listing if i.get("type") == "file"]
    if full:
        return [i for i in files if i["name"].endswith((".safetensors", ".json"))], True
    chosen = [i for i in files if i["name"].rsplit("/", 1)[-1] in _ADAPTER_FILES]
    if not any(i["name"].endswith("/adapter_config.json") for i in chosen):
        raise SourceError("not a PEFT adapter directory (no adapter_config.json)", path)
    return chosen, True


def _identity(files: Sequence[Mapping[str, Any]], root: str) -> str:
    """A digest of each file's name, size and validators (ETag, mtime…): changes when a source changes."""
    digest = hashlib.sha256()
    for info in sorted(files, key=lambda i: i["name"]):
        relative = info["name"][len(root):].lstrip("/")
        digest.update(f"{relative}\0{info.get('size')}\0{object_identity(info) or ''}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _local(fs: Any, path: str, files: Sequence[Mapping[str, Any]], is_dir: bool) -> Iterator[str]:
    """A local path to the source: itself on a local file system, else a temporary copy of ``files``."""
    local = local_path(fs, path)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="compeft-source-") as tmp:
        yield _copy_files(fs, path, files, is_dir, tmp, "fetching the source")


def _copy_files(fs: Any, path: str, files: Sequence[Mapping[str, Any]], is_dir: bool, directory: str,
                what: str) -> str:
    """Copy ``files`` of the source or base at ``path`` into ``directory``; the local path to use."""
    for info in files:
        target = os.path.join(directory, info["name"].rsplit("/", 1)[-1])
        attempt(lambda i=info, t=target: fs.get_file(i["name"], t), what, redact(info["name"]))
    return directory if is_dir else os.path.join(directory, path.rsplit("/", 1)[-1])


# Per worker process: remote bases fetched, (URL, identity) -> (their directory, the local path to use).
_BASES: dict[tuple[str, str], tuple[tempfile.TemporaryDirectory[str], str]] = {}


def _base_path(base: str, options: Mapping[str, Any]) -> tuple[str, str]:
    """(a local path to the base, its identity); a remote base is fetched once per process."""
    fs, path = resolve(base, options) if is_url(base) else resolve(os.path.abspath(base), options)
    files, is_dir = _source_files(fs, path, full=True)
    identity = _identity(files, path)
    local = local_path(fs, path)
    if local is not None:
        return local, identity
    key = (redact(base), identity)
    if key not in _BASES:
        holder = tempfile.TemporaryDirectory(prefix="compeft-base-")
        _BASES[key] = (holder, _copy_files(fs, path, files, is_dir, holder.name, "fetching the base"))
    return _BASES[key][1], identity


def catalog_entry(expert: CompressedExpert, data: bytes, name: str, record: Mapping[str, Any]) -> dict[str, Any]:
    meta = expert.metadata
    config = meta.get("adapter_config") or {}
    base_model = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    return CatalogEntry(
        name=name, file=name + EXPERT_SUFFIX, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        density=meta["density"], alpha=meta.get("alpha"), alpha_rule=meta.get("alpha_rule"), scope=meta["scope"],
        source=meta["source"], base_fingerprint=meta.get("base_fingerprint"),
        base_model=base_model if isinstance(base_model, str) else None,
        peft_type=peft_type if isinstance(peft_type, str) else None,
        parameters=sum(e.numel for e in expert.header.tensors), tensors=len(expert.header.tensors),
        origin=record["origin"], source_id=record["source_id"]).to_json()


def _already_built(fs: Any, path: str, where: str, record: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The catalog entry of an existing output built from the same source with the same settings
    and intact (every checksum and payload verified), else None (missing, stale or corrupt)."""
    data = fetch_object(fs, path, "reading the existing output", where)
    if data is None:
        return None
    try:
        expert = CompressedExpert(BytesReader(data, name=where))
        if expert.metadata.get("build") != record:
            return None
        expert.verify()
    except CompeftError:
        return None  # a corrupt or foreign file is rebuilt (atomically replaced)
    return catalog_entry(expert, data, name, record)


def build_expert(job: Mapping[str, Any]) -> dict[str, Any]:
    """Build (or find already built) one expert of a library. Runs on a worker: plain data in and
    out, and every failure of the source comes back as ``{"status": "failed", "reason": …}`` so that
    one bad input never fails the others (and is not retried: it would fail again)."""
    name, settings, options = job["name"], job["settings"], job["storage_options"]
    origin = redact(job["source"])
    if job.get("kernel_threads"):
        _set_threads(int(job["kernel_threads"]))
    read = 0
    try:
        fs, path = resolve(job["source"] if is_url(job["source"]) else os.path.abspath(job["source"]), options)
        full = job["base"] is not None
        files, is_dir = _source_files(fs, path, full)
        read = sum(int(i.get("size") or 0) for i in files)
        base_local, base_identity = _base_path(job["base"], options) if full else (None, "")
        source_id = _identity(files, path)
        if full:
            source_id = hashlib.sha256(f"{source_id}\0{base_identity}".encode()).hexdigest()
        record = {"name": name, "origin": origin, "source_id": source_id, "settings": settings}
        out_fs, out_path = resolve(job["output"], options)
        found = _already_built(out_fs, out_path, redact(job["output"]), record, name)
        if found is not None:
            return {"status": "skipped", "entry": found, "bytes_read": 0}
        with _local(fs, path, files, is_dir) as local:
            expert = compress_source(local, base_local, settings, record)
        data = expert.to_bytes()
        entry = catalog_entry(expert, data, name, record)
        write(job["output"], [data], options)
        return {"status": "built", "entry": entry, "bytes_read": read}
    except CompeftError as exc:
        return {"status": "failed", "reason": str(exc), "bytes_read": read}
    except (OSError, ValueError, RuntimeError) as exc:  # e.g. a source the file system cannot read
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500], "bytes_read": read}


def compress_source(local: str, base: str | None, settings: Mapping[str, Any], record: Mapping[str, Any]
              ) -> CompressedExpert:
    """The expert (in memory) of the source at ``local`` with ``settings``."""
    encoded = encode_source(resolve_source(local, base), density=settings["density"], scope=settings["scope"],
                            keep_dense=settings["keep_dense"], auto_dense=settings["auto_dense"],
                            chunk_size=settings["chunk_size"], metadata=None, progress=False)
    return encoded.build(settings["alpha"], {"build": dict(record)})


def _set_threads(count: int) -> None:
    """Kernel threads of this task (Numba's count is per calling thread, torch's per process)."""
    import numba
    import torch
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(count)
