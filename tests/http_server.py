"""A real HTTP server on 127.0.0.1 for the download tests, able to misbehave in the ways servers do.

Each path is a Route: a body and how to serve it (honouring Range or not, failing with a status a number of
times, dropping the connection or stalling at a byte offset). The server records every request it sees,
with its Range header, so tests can assert what the client asked for.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """How one path is served."""

    body: bytes
    content_type: str = "application/x-gzip"
    status: int = 200  # answer with this status (and a short text body) ...
    fail_times: int | None = None  # ... this many times before serving the body; None: every time
    ranges: bool = True  # honour "Range: bytes=N-"; False answers 200 with the whole body, as some servers do
    drop_at: int | None = None  # close the connection when this byte offset of the body is reached ...
    drop_times: int = 1  # ... on this many responses
    stall_at: int | None = None  # stop sending at this offset and hold the connection open until shutdown


@dataclass(frozen=True)
class Seen:
    path: str
    range: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client hanging up on a connection it no longer needs (the download's client closing a kept-alive
        # socket after a 404, say) is what real servers see all the time. socketserver printed its traceback
        # to sys.stderr, which an in-process CLI run captures as the command's own output.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalServer:
    """A threaded HTTP/1.1 server on a free port of 127.0.0.1; use as a context manager."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._release = threading.Event()  # set at shutdown, to end stalled responses
        self._httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval makes shutdown quick; the default half second adds up over a test file.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}{path}"

    def serve(self, path: str, route: Route) -> str:
        """Serves ``route`` at ``path``; returns its URL."""
        self.routes[path] = route
        return self.url(path)

    def ranges_seen(self, path: str) -> list[str | None]:
        with self._lock:
            return [seen.range for seen in self.seen if seen.path == path]

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler_for(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep pytest's output clean
            pass

        def do_GET(self) -> None:
            with server._lock:
                server.seen.append(Seen(self.path, self.headers.get("Range")))
                route = server.routes.get(self.path)
                failing = route is not None and route.status != 200 and route.fail_times != 0
                if failing and route.fail_times is not None:
                    route.fail_times -= 1
            if route is None or failing:
                status = 404 if route is None else route.status
                self._send_text(status, f"{status} from the test server\n".encode())
                return
            self._send_body(route)

        def _send_text(self, status: int, text: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def _send_body(self, route: Route) -> None:
            body = memoryview(route.body)
            size = len(body)
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and route.ranges:
                start = int(match.group(1))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(size - start))
            self.send_header("Accept-Ranges", "bytes" if route.ranges else "none")
            self.end_headers()
            stop, stall = size, False
            with server._lock:
                if route.drop_at is not None and route.drop_times > 0 and start < route.drop_at:
                    route.drop_times -= 1
                    stop = route.drop_at
            if route.stall_at is not None and start < route.stall_at:
                stop, stall = route.stall_at, True
            try:
                for offset in range(start, stop, 1 << 20):
                    self.wfile.write(body[offset : min(offset + (1 << 20), stop)])
                if stall:
                    server._release.wait(120)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should
            if stop < size:
                self.close_connection = True  # the client sees the body end early

    return Handler
