"""A slow prefill host, for lookups: an HTTP front that forwards GETs to a real bootstrap service and holds
each answer back for `delay_s` (read when the request arrives; the service answers first, so a delayed
answer carries what the service said *before* the delay). Each request runs on a thread of its own."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SlowBootstrapFront:
    """Serves on 127.0.0.1:`port` what the bootstrap service at `upstream` ("host:port") answers, `delay_s`
    later. Attributes: `host`, `port`, `delay_s` (change it any time), `requests` (GETs answered or under
    way). Call `close()` to stop listening: the port then refuses connections, as a dead host's would."""

    def __init__(self, upstream: str, delay_s: float = 0.0) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.requests = 0
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                with front._lock:
                    front.requests += 1
                delay = front.delay_s
                try:
                    with urllib.request.urlopen(f"http://{front.upstream}{self.path}", timeout=5) as answer:
                        status, body = answer.status, answer.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host, self.port = "127.0.0.1", int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="slow-bootstrap", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and join the server thread. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
