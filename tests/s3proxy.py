"""An HTTP proxy in front of a local S3 server that adds latency and faults, and counts.

    with FaultProxy("http://127.0.0.1:5000", latency_s=0.02, fail_every=20, slow_every=100,
                    slow_s=2.0) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url    # every S3 client goes through it
        ...
        proxy.requests                                # requests answered, faults included

What object storage does to a job at scale, on 127.0.0.1: every request waits
`latency_s` before it is forwarded (a region's round trip); the `fail_every`-th request
is answered `503 SlowDown` without reaching the server (S3's throttling reply, 5% at
20); the `slow_every`-th waits `slow_s` more. Which requests are hit is decided by their
arrival order, not by chance, so a run is repeatable. While `held` (an Event) is not set,
a reply's body (of the requests `hold(method, path)` names; default: every one) is sent
a byte at a time, one every `TRICKLE_S`, until it is: the client waits as long as the
test wants (a request answered slowly, not a silent one, which the AWS SDK would time
out after 3 s and retry), and goes on at full speed once it is set.
HTTP/1.1 keep-alive on both sides (one upstream connection per client connection), as a
real endpoint would be used.

Used by the tests (test_object_storage_faults.py) and the start-up benchmark; standard
library only.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")
TRICKLE_S = 0.25  # a held body's pace: over the SDK's "1 byte in 3 s" low-speed limit
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
               "te", "trailer"}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a daemon stopped while its reads were in flight) is no
        error of the proxy's: only anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream: str, *, latency_s: float = 0.0, fail_every: int = 0,
                 slow_every: int = 0, slow_s: float = 0.0,
                 held: threading.Event | None = None,
                 hold: Callable[[str, str], bool] | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.latency_s = latency_s
        self.hold = hold  # (method, path) -> whether `held` holds it (None: every request)
        self.fail_every = fail_every
        self.slow_every = slow_every
        self.slow_s = slow_s
        self.held = held
        self.lock = threading.Lock()
        self.requests = 0  # every request received, faults included
        self.failed = 0  # answered 503 by the proxy
        self.slowed = 0
        self.by_method: Counter[str] = Counter()
        self.connections: set[socket.socket] = set()  # closed on exit: keep-alive threads end
        self.server = _Server(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = False  # server_close() joins every handler thread
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="s3-fault-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.requests = self.failed = self.slowed = 0
            self.by_method.clear()

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.held is not None:
            self.held.set()  # no handler thread stays in a trickle
        self.server.shutdown()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.server.server_close()
        self.thread.join(timeout=10)

    def _decide(self, method: str) -> tuple[bool, float]:
        """(answer 503, extra delay) for the next request, by arrival order."""
        with self.lock:
            self.requests += 1
            self.by_method[method] += 1
            n = self.requests
            fail = self.fail_every > 0 and n % self.fail_every == 0
            slow = self.slow_every > 0 and n % self.slow_every == self.slow_every // 2
            self.failed += fail
            self.slowed += slow
        return fail, self.latency_s + (self.slow_s if slow else 0.0)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy.connections.add(self.connection)

            def finish(self) -> None:
                with proxy.lock:
                    proxy.connections.discard(self.connection)
                if self.upstream is not None:
                    self.upstream.close()
                with contextlib.suppress(OSError):
                    super().finish()

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self) -> None:
                body = self._body()
                fail, delay_s = proxy._decide(self.command)
                if delay_s:
                    time.sleep(delay_s)  # the simulated network, not a synchronization
                if fail:
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_HEADERS}
                for attempt in range(2):  # an idle upstream connection may have been closed
                    if self.upstream is None:
                        self.upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                    try:
                        self.upstream.request(self.command, self.path, body=body,
                                              headers=headers)
                        reply = self.upstream.getresponse()
                        data = reply.read()
                        break
                    except (http.client.HTTPException, OSError):
                        self.upstream.close()
                        self.upstream = None
                        if attempt:
                            raise
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                if self.command == "HEAD":
                    length_header = reply.getheader("Content-Length")
                    self.send_header("Content-Length", length_header or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    # a client that stopped (a daemon shut down mid-read) is no server error
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self._send_body(data, proxy.hold is None or proxy.hold(
                            self.command, urlsplit(self.path).path))

            def _send_body(self, data: bytes, holds: bool) -> None:
                sent = 0
                while holds and proxy.held is not None and sent < len(data) - 1:
                    if proxy.held.wait(TRICKLE_S):  # released: the rest at once
                        break
                    self.wfile.write(data[sent:sent + 1])
                    self.wfile.flush()
                    sent += 1
                self.wfile.write(data[sent:])

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler
