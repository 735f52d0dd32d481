"""Experts over the network, against real servers on 127.0.0.1 started by the fixtures: an HTTP
server that honours Range (and variants that ignore it, fail, cut bodies short or drop ETags) and
moto's S3 server driven through s3fs (``tests/servers.py``). No test leaves the machine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compeft
from compeft import remote
from compeft.cli import main
from compeft.errors import ChecksumError, RemoteError, TruncatedFileError
from compeft.expert import CompressedExpert
from compeft.format import FileReader

pytest.importorskip("aiohttp", reason="the HTTP file system of fsspec needs aiohttp (compeft[remote])")

sys.path.insert(0, str(Path(__file__).parent))
from servers import moto_server, object_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def many_tensors(seed: int, count: int = 120) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i:03d}.weight": torch.randn(48, 40, generator=g).to(torch.bfloat16) for i in range(count)}


@pytest.fixture(scope="module")
def expert() -> CompressedExpert:
    """An in-memory expert of 120 tensors (~100 KB)."""
    return compeft.compress(many_tensors(0), density=0.1)


@pytest.fixture(scope="module")
def blob(expert) -> bytes:
    return expert.to_bytes()


@pytest.fixture(scope="module")
def decoded(expert) -> dict[str, torch.Tensor]:
    return expert.state_dict()


@pytest.fixture
def http():
    with object_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server; yields (storage_options, bucket URL prefix)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with moto_server() as options:
        fs, _ = remote.resolve("s3://compeft-tests", options)
        fs.call_s3("create_bucket", Bucket="compeft-tests")
        yield options, "s3://compeft-tests"


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def quick(url: str, **options) -> CompressedExpert:
    """Open with short backoffs, so that retry tests stay fast."""
    return CompressedExpert(remote.open_reader(url, backoff=0.01, **options))


# ---------------------------------------------------------------------------------------------
# requests and bytes


def test_header_takes_two_exact_requests(http, blob, expert):
    url = http.put("e.cpeft", blob)
    opened = compeft.open(url)
    assert opened.names == expert.names
    assert http.gets == 2 and http.requests == 2
    assert http.bytes_served == opened.header.data_start  # preamble + header, nothing more


def test_one_tensor_is_one_range_request_of_its_payload(http, blob, decoded):
    opened = compeft.open(http.put("e.cpeft", blob))
    http.reset_counts()
    name = opened.names[57]
    assert torch.equal(opened.to_dense(name), decoded[name])
    assert http.gets == 1
    assert http.bytes_served == opened.entry(name).length


def test_reading_everything_moves_the_file_once(http, blob, decoded):
    opened = compeft.open(http.put("e.cpeft", blob))
    assert same_state(opened.state_dict(), decoded)
    opened.verify()  # checksums, padding and structure: served from the bytes already fetched
    assert http.bytes_served == len(blob)
    assert http.gets == 3  # preamble, header, one coalesced run of all payloads


def test_long_ranges_are_fetched_as_concurrent_parts(http, blob, decoded, monkeypatch):
    monkeypatch.setattr(remote, "PART_SIZE", 4096)
    http.pacer = __import__("servers").Pacer(20e6)  # slow enough that parts overlap in time
    opened = compeft.open(http.put("e.cpeft", blob))
    http.reset_counts()
    assert same_state(opened.state_dict(), decoded)
    body = len(blob) - opened.header.data_start
    assert http.gets == -(-body // 4096)
    assert http.max_in_flight > 1
    assert http.max_in_flight <= remote.DEFAULT_WORKERS
    assert http.bytes_served == body


def test_fetched_bytes_are_not_fetched_again(http, blob, decoded):
    opened = compeft.open(http.put("e.cpeft", blob))
    names = opened.names[10:20]
    opened.state_dict(names)
    http.reset_counts()
    again = opened.state_dict(names)
    assert http.requests == 0
    assert same_state(again, {n: decoded[n] for n in names})


def test_prefetch_then_read_asks_once(http, blob, decoded):
    opened = compeft.open(http.put("e.cpeft", blob))
    http.reset_counts()
    opened.prefetch()
    for name in opened.names:  # tensor by tensor, as decompress does
        assert torch.equal(opened.to_dense(name), decoded[name])
    assert http.gets == 1 and http.bytes_served == len(blob) - opened.header.data_start


# ---------------------------------------------------------------------------------------------
# wrong bytes, failures, misbehaving servers


def test_corrupted_remote_payload_is_a_checksum_error(http, blob):
    opened = compeft.open(http.put("e.cpeft", blob))
    entry = opened.entry(opened.names[3])
    bad = bytearray(blob)
    bad[opened.header.data_start + entry.offset + entry.length // 2] ^= 0x10
    http.put("e.cpeft", bytes(bad))
    with pytest.raises(ChecksumError, match=r"http://127\.0\.0\.1:\d+/e\.cpeft: tensor 'layers\.003\.weight'"):
        opened.to_dense(entry.name)
    opened.to_dense(opened.names[4])  # its neighbours are intact


def test_transient_failures_are_retried(http, blob, decoded):
    url = http.put("e.cpeft", blob)
    http.fail_next = 2  # two 503s
    opened = quick(url)
    http.cut_next = 1  # then a body cut off mid-way
    assert same_state(opened.state_dict(), decoded)
    assert opened._reader.stats.retries == 3


def test_transient_failure_of_the_metadata_request_is_retried(http, blob, decoded, tmp_path):
    url = http.put("e.cpeft", blob)
    http.fail_next = 2  # fsspec reports a failed HEAD as FileNotFoundError; the 503 under it counts
    opened = quick(url, cache=tmp_path)
    assert same_state(opened.state_dict(), decoded)
    assert opened._reader.stats.retries >= 1


def test_retries_are_bounded(http, blob):
    url = http.put("e.cpeft", blob)
    http.fail_next = 100
    with pytest.raises(RemoteError, match=r"e\.cpeft: reading bytes 0-31 failed after 3 attempts: .*503"):
        CompressedExpert(remote.open_reader(url, retries=2, backoff=0.01))
    assert http.requests == 3


def test_missing_object_is_not_retried(http):
    with pytest.raises(RemoteError, match=r"missing\.cpeft: no such object"):
        quick(http.url("missing.cpeft"))
    assert http.requests == 1


def test_truncated_object_is_detected(http, blob, tmp_path):
    url = http.put("e.cpeft", blob[:-500])
    opened = compeft.open(url)
    last = opened.names[-1]
    with pytest.raises(TruncatedFileError, match="shorter than its header declares"):
        opened.to_dense(last)
    with pytest.raises(TruncatedFileError, match="truncated"):  # with a cache the size is known at open
        compeft.open(url, cache=tmp_path)


def test_server_ignoring_range_falls_back_to_one_download(blob, decoded):
    with object_server(honour_range=False) as server:
        url = server.put("e.cpeft", blob)
        with pytest.warns(remote.RangeIgnoredWarning, match="ignores Range"):
            opened = compeft.open(url)
        assert same_state(opened.state_dict(), decoded)
        opened.verify()
        assert server.gets == 1 and server.bytes_served == len(blob)


def test_server_ignoring_range_with_a_truncated_object(blob):
    with object_server(honour_range=False) as server:
        url = server.put("e.cpeft", blob[:-64])
        with pytest.warns(remote.RangeIgnoredWarning), pytest.raises(TruncatedFileError, match="truncated"):
            compeft.open(url)


def test_passwords_stay_out_of_messages(http):
    url = http.url("missing.cpeft").replace("http://", "http://user:hunter2@")
    with pytest.raises(RemoteError) as caught:
        quick(url)
    assert "hunter2" not in str(caught.value) and "user:***@" in str(caught.value)


def test_missing_protocol_package_names_the_extra(monkeypatch):
    import fsspec.core

    def refuse(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", refuse)
    with pytest.raises(RemoteError, match=r"compeft\[remote\]"):
        compeft.open("s3://bucket/e.cpeft")


# ---------------------------------------------------------------------------------------------
# the persistent cache


def pieces(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.name != "object.json")


def test_cache_serves_a_second_open_without_downloads(http, blob, decoded, tmp_path):
    url = http.put("e.cpeft", blob)
    first = compeft.open(url, cache=tmp_path)
    assert same_state(first.state_dict(), decoded)
    assert http.gets <= 3  # header with the size known: one 64 KiB read, then the rest
    http.reset_counts()
    second = compeft.open(url, cache=tmp_path)
    assert same_state(second.state_dict(), decoded)
    assert [r.method for r in http.log] == ["HEAD"]  # only the identity check
    assert second._reader.stats.cache_bytes == len(blob)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_cache_never_serves_a_changed_object(http, blob, tmp_path):
    url = http.put("e.cpeft", blob)
    compeft.open(url, cache=tmp_path).state_dict()
    changed = compeft.compress(many_tensors(1), density=0.1)
    http.put("e.cpeft", changed.to_bytes())
    http.reset_counts()
    assert same_state(compeft.open(url, cache=tmp_path).state_dict(), changed.state_dict())
    assert http.bytes_served == changed.header.file_length


def test_cache_is_not_used_without_a_validator(blob, decoded, tmp_path):
    with object_server(etag=False, last_modified=False) as server:
        url = server.put("e.cpeft", blob)
        with pytest.warns(UserWarning, match="cache is not used"):
            opened = compeft.open(url, cache=tmp_path)
        assert same_state(opened.state_dict(), decoded)
    assert pieces(tmp_path) == []


def test_corrupt_cache_piece_is_fetched_again(http, blob, decoded, tmp_path):
    url = http.put("e.cpeft", blob)
    compeft.open(url, cache=tmp_path).state_dict()
    for piece in pieces(tmp_path):
        data = bytearray(piece.read_bytes())
        data[len(data) // 2] ^= 0xFF
        piece.write_bytes(bytes(data))
    http.reset_counts()
    assert same_state(compeft.open(url, cache=tmp_path).state_dict(), decoded)
    assert http.bytes_served == len(blob)


def test_two_processes_share_a_cache(http, blob, decoded, tmp_path):
    url = http.put("e.cpeft", blob)
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import hashlib, compeft
        expert = compeft.open({url!r}, cache={str(cache)!r})
        for _ in range(3):
            state = expert.state_dict()
            expert = compeft.open({url!r}, cache={str(cache)!r})
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(state[name].view(-1).view(__import__("torch").uint8).numpy().tobytes())
        print(digest.hexdigest())
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    expected = hashlib.sha256()
    for name in sorted(decoded):
        expected.update(decoded[name].view(-1).view(torch.uint8).numpy().tobytes())
    assert [out.strip() for out, _ in outputs] == [expected.hexdigest()] * 2
    assert not list(cache.rglob("*.tmp"))  # no partial files left behind
    for piece in pieces(cache):  # every piece is complete and matches its name's CRC
        start, end = map(int, piece.name.split(".")[0].split("-"))
        assert piece.read_bytes() == blob[start:end]


# ---------------------------------------------------------------------------------------------
# local URLs, writes, S3


def test_file_url_and_plain_path_open_the_same_way(expert, decoded, tmp_path):
    path = tmp_path / "e.cpeft"
    expert.save(path)
    for target in (str(path), path, f"file://{path}"):
        opened = compeft.open(target)
        assert isinstance(opened._reader, FileReader)
        assert same_state(opened.state_dict(), decoded)
    expert.save(f"file://{tmp_path}/via-url.cpeft")
    assert (tmp_path / "via-url.cpeft").read_bytes() == path.read_bytes()


def test_write_through_a_temporary_object_where_one_put_is_not_atomic(expert, blob, monkeypatch):
    import fsspec

    monkeypatch.setattr(remote, "_SINGLE_PUT_STORES", frozenset())
    expert.save("memory://atomic/e.cpeft")
    fs = fsspec.filesystem("memory")
    assert fs.ls("/atomic", detail=False) == ["/atomic/e.cpeft"]  # the temporary object was moved
    assert fs.cat_file("/atomic/e.cpeft") == blob


def test_s3_round_trip(s3, expert, decoded, tmp_path):
    options, bucket = s3
    url = f"{bucket}/round-trip.cpeft"
    expert.save(url, storage_options=options)
    opened = compeft.open(url, storage_options=options)
    assert opened._reader.stats.requests == 2
    name = opened.names[5]
    assert torch.equal(opened.to_dense(name), decoded[name])
    assert opened._reader.stats.bytes_fetched == opened.header.data_start + opened.entry(name).length
    assert same_state(opened.state_dict(), decoded)
    opened.verify()
    cached = compeft.open(url, storage_options=options, cache=tmp_path)
    assert same_state(cached.state_dict(), decoded)
    chained = compeft.open(f"simplecache::{url}", storage_options={"s3": options,
                                                                   "simplecache": {"cache_storage": str(tmp_path / "sc")}})
    assert same_state(chained.state_dict(), decoded)


def test_s3_missing_key_and_bucket(s3):
    options, bucket = s3
    with pytest.raises(RemoteError, match="no such object"):
        compeft.open(f"{bucket}/nothing-here.cpeft", storage_options=options)


# ---------------------------------------------------------------------------------------------
# merging and the command line


def test_merge_from_urls_matches_local_merge(http, monkeypatch):
    from compeft import merging

    experts = [compeft.compress(many_tensors(seed), density=0.2) for seed in (3, 4, 5)]
    urls = [http.put(f"m{i}.cpeft", e.to_bytes()) for i, e in enumerate(experts)]
    monkeypatch.setattr(merging, "GROUP_PARAMETERS", 20_000)  # several groups: prefetching the next one
    http.reset_counts()
    merged = compeft.merge([compeft.open(u) for u in urls], method="ties")
    assert same_state(dict(merged), dict(compeft.merge(experts, method="ties")))
    assert http.bytes_served == sum(e.header.file_length for e in experts)  # every byte fetched once


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    directory = tmp_path / "adapter"
    directory.mkdir()
    g = torch.Generator().manual_seed(1)
    names = [f"base_model.model.layers.{i}.q_proj.lora_{p}.weight" for i in range(3) for p in "AB"]
    weights = {n: torch.randn(4, 32, generator=g) if "lora_A" in n else torch.randn(32, 4, generator=g) for n in names}
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                               "target_modules": ["q_proj"]}))
    return directory


def test_cli_with_s3_urls(s3, adapter_dir, tmp_path, capsys):
    options, bucket = s3
    flags = ["--storage-option", "key=testing", "--storage-option", "secret=testing",
             "--storage-option", f"client_kwargs.endpoint_url={options['client_kwargs']['endpoint_url']}",
             "--storage-options", '{"client_kwargs": {"region_name": "us-east-1"}}']
    url = f"{bucket}/cli/adapter.cpeft"
    assert main(["compress", str(adapter_dir), "-o", url, "--density", "0.25", *flags]) == 0
    assert main(["inspect", url, "--json", *flags]) == 0
    printed = capsys.readouterr().out  # compress's report, then inspect's JSON
    summary = json.loads(printed[printed.index("\n{") + 1:])
    assert summary["totals"]["tensors"] == 6
    assert main(["verify", url, *flags]) == 0
    assert "OK (6 tensors" in capsys.readouterr().out
    out = tmp_path / "restored"
    assert main(["decompress", url, "-o", str(out), "--cache", str(tmp_path / "cache"), *flags]) == 0
    restored = load_file(str(out / "adapter_model.safetensors"))
    local = compeft.compress(str(adapter_dir), density=0.25)
    assert same_state(restored, {n: local.to_dense(n) for n in local.names})


def test_cli_merge_and_errors_with_http_urls(http, tmp_path, capsys):
    experts = [compeft.compress(many_tensors(seed), density=0.2) for seed in (6, 7)]
    urls = [http.put(f"c{i}.cpeft", e.to_bytes()) for i, e in enumerate(experts)]
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *urls, "--method", "task_arithmetic", "-o", str(out), "-q"]) == 0
    assert same_state(load_file(str(out)), dict(compeft.merge(experts)))
    capsys.readouterr()
    assert main(["inspect", http.url("gone.cpeft")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"compeft: error: {http.url('gone.cpeft')}: no such object"]
    assert main(["inspect", urls[0], "--storage-option", "novalue"]) == 2
    assert "--storage-option expects KEY=VALUE" in capsys.readouterr().err


def test_cli_inspect_url_imports_neither_torch_nor_numba(http, blob):
    url = http.put("e.cpeft", blob)
    code = ("import sys; from compeft.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'numba' not in sys.modules, 'heavy import'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "120 tensors" in proc.stdout
    assert http.gets == 2


def test_core_works_without_the_remote_extra(expert, tmp_path):
    """With aiohttp and s3fs unimportable, local files and memory:// work and http:// names the extra."""
    path = tmp_path / "e.cpeft"
    expert.save(path)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["aiohttp"] = None  # as if not installed
        sys.modules["s3fs"] = None
        import compeft
        from compeft.errors import RemoteError
        local = compeft.open({str(path)!r})
        local.save("memory://no-extra/e.cpeft")
        assert compeft.open("memory://no-extra/e.cpeft").names == local.names
        for url in ("http://127.0.0.1:9/e.cpeft", "s3://bucket/e.cpeft"):
            try:
                compeft.open(url)
            except RemoteError as exc:
                assert "compeft[remote]" in str(exc), exc
            else:
                raise AssertionError("opened without the extra")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
