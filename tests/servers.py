"""Real servers on loopback for the remote tests and the remote benchmark.

:class:`ObjectServer` is an HTTP/1.1 server (stdlib ``http.server``) of in-memory objects. It
honours single ``Range`` requests like a file server (206 / 416, ``Content-Range``), sends ``ETag``
and ``Last-Modified``, and counts the requests and body bytes it serves. Switches make it
misbehave: ignore ``Range`` (200 with the whole object), answer the first N requests with 503,
cut the first N bodies short (the connection closes mid-body), and pace its output to a rate
shared by all connections (a throttled link).

:func:`moto_server` starts moto's S3-compatible server in a thread on 127.0.0.1.
Nothing here listens on any other address.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class Served:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


class Pacer:
    """Paces writes of all connections together to ``rate`` bytes per second (a shared link)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def wait(self, nbytes: int) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + nbytes / self.rate
            done = self._free_at
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class ObjectServer:
    """An HTTP server of ``objects`` (path → bytes) on 127.0.0.1 and a free port."""

    def __init__(self, *, honour_range: bool = True, etag: bool = True, last_modified: bool = True,
                 rate: float | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.honour_range, self.etag, self.last_modified = honour_range, etag, last_modified
        self.pacer = Pacer(rate) if rate else None
        self.fail_next = 0  # answer this many coming requests with 503
        self.cut_next = 0  # send only half of this many coming bodies, then close the connection
        self.log: list[Served] = []
        self.in_flight = self.max_in_flight = 0  # GETs being answered now, and the most at once
        self._versions: dict[str, float] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- control -------------------------------------------------------------------------------
    def start(self) -> "ObjectServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def put(self, name: str, data: bytes) -> str:
        """Store an object (a new version) and return its URL."""
        with self._lock:
            self.objects[name] = bytes(data)
            # a later second than the previous version, so Last-Modified changes too
            self._versions[name] = max(time.time(), self._versions.get(name, 0) + 1)
        return self.url(name)

    def url(self, name: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def reset_counts(self) -> None:
        with self._lock:
            self.log.clear()
            self.max_in_flight = 0

    @property
    def requests(self) -> int:
        return len(self.log)

    @property
    def gets(self) -> int:
        return sum(1 for r in self.log if r.method == "GET")

    @property
    def bytes_served(self) -> int:
        return sum(r.body_bytes for r in self.log)

    def _record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    def _take(self, attribute: str) -> bool:
        with self._lock:
            if getattr(self, attribute) > 0:
                setattr(self, attribute, getattr(self, attribute) - 1)
                return True
            return False


def _handler(server: ObjectServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers: clients reuse connections

        def setup(self) -> None:
            super().setup()
            # As production servers do: without it, headers then body as two small writes meet the
            # client's delayed ACK and every response stalls ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass

        def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            with server._lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._answer(body=True)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _answer(self, body: bool) -> None:
            name = self.path.lstrip("/").split("?", 1)[0]
            asked = self.headers.get("Range")
            if server._take("fail_next"):
                return self._send(503, b"busy", asked, {}, body)
            data = server.objects.get(name)
            if data is None:
                return self._send(404, b"not found", asked, {}, body)
            headers = {"Accept-Ranges": "bytes" if server.honour_range else "none",
                       "Content-Type": "application/octet-stream"}
            if server.etag:
                headers["ETag"] = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            if server.last_modified:
                headers["Last-Modified"] = email.utils.formatdate(server._versions[name], usegmt=True)
            status, start, end = 200, 0, len(data)
            if asked and server.honour_range:
                match = _RANGE.match(asked.strip())
                if match and (match[1] or match[2]):
                    if match[1]:
                        start = int(match[1])
                        end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
                    else:  # a suffix: the last n bytes
                        start, end = max(0, len(data) - int(match[2])), len(data)
                    if start >= len(data) or start >= end:
                        headers["Content-Range"] = f"bytes */{len(data)}"
                        return self._send(416, b"", asked, headers, body)
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            self._send(status, data[start:end], asked, headers, body)

        def _send(self, status: int, payload: bytes, asked: str | None, headers: dict[str, str], body: bool) -> None:
            cut = body and status in (200, 206) and server._take("cut_next")
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            if cut:
                self.send_header("Connection", "close")
            # Counted before the client can see anything, so a test that reads the counts right after
            # its response never misses this request.
            served = Served(self.command, self.path, asked, status, 0)
            server._record(served)
            self.end_headers()
            if body:
                chunk = 64 * 1024
                stop = len(payload) // 2 if cut else len(payload)
                for i in range(0, stop, chunk):
                    piece = payload[i: min(i + chunk, stop)]
                    if server.pacer is not None:
                        server.pacer.wait(len(piece))
                    served.body_bytes += len(piece)
                    try:
                        self.wfile.write(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        break
            if cut:
                self.close_connection = True

    return Handler


@contextlib.contextmanager
def object_server(**options: Any) -> Iterator[ObjectServer]:
    server = ObjectServer(**options).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def moto_server() -> Iterator[dict[str, Any]]:
    """moto's S3 server on 127.0.0.1 (a thread); yields the s3fs ``storage_options`` that reach it.
    The AWS variables are pinned so that nothing looks for real credentials or metadata services."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    pinned = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
              "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
              "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {k: os.environ.get(k) for k in pinned}
    os.environ.update(pinned)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
