"""A real HTTP proxy in front of the local S3 server that fails some requests with 503 SlowDown.

Used to test that transient S3 errors are retried with backoff (botocore's standard retry
mode inside s3fs, then our per-shard retry). It forwards every other request unchanged.
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message></Error>')
UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
               b'<Message>Service is unable to handle request.</Message></Error>')


class FlakyProxy:
    """Forward to ``upstream``; answer 503 to every ``fail_every``-th request (counting from 1)."""

    def __init__(self, upstream: str, fail_every: int = 3, only=None, max_failures: int | None = None,
                 body: bytes = SLOWDOWN):
        """``only(method, path, headers) -> bool``: the requests that may fail (default all);
        ``max_failures``: stop failing after that many; ``body``: the 503's error document (SlowDown,
        which s3fs retries itself, or :data:`UNAVAILABLE`, which it does not)."""
        self.body = body
        self.upstream = urlparse(upstream)
        self.fail_every = fail_every
        self.only = only
        self.max_failures = max_failures
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy._lock:
                    eligible = proxy.only is None or proxy.only(self.command, self.path, self.headers)
                    proxy.requests += 1 if eligible else 0
                    fail = (eligible and proxy.fail_every > 0 and proxy.requests % proxy.fail_every == 0
                            and (proxy.max_failures is None or proxy.failed < proxy.max_failures))
                    if fail:
                        proxy.failed += 1
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.body)))
                    self.end_headers()
                    self.wfile.write(proxy.body)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD: keep the upstream object size (there is no body to measure)
                length = r.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
