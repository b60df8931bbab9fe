"""A TLS-terminating HTTPS proxy on loopback that lets TensorFlow's built-in
GCS filesystem talk to a local GCS emulator (gcp-storage-emulator, plain
HTTP), for tests/test_bucket.py.

TensorFlow's GCS filesystem has its endpoints written in (https://
www.googleapis.com, https://storage.googleapis.com) and no setting for an
emulator, but its libcurl honours ``https_proxy`` and ``CURL_CA_BUNDLE``. So
a run's environment names this proxy and a test CA; the proxy answers
CONNECT, ends TLS with a certificate for those hosts signed by that CA, and
forwards each request to the emulator, mending three things the emulator
does otherwise than GCS:

* ``GET b/BUCKET/storageLayout`` (asked before a folder is renamed) is
  unknown to it: answered here (a flat bucket);
* a resumable upload's ``Location`` comes back as ``http://``: made
  ``https://`` so that the upload returns through this proxy;
* an empty ``uploadType=media`` upload (TensorFlow's folder marker) fails
  in it: sent as an empty resumable upload instead.

Run: python tests/gcs_proxy.py UPSTREAM_PORT CERT KEY; it prints its port.
Standard library only.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "content-length",
    "expect",
}
_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(\?.*)?$")


class _Inner(BaseHTTPRequestHandler):
    """The decrypted requests inside one CONNECT tunnel."""

    protocol_version = "HTTP/1.1"
    upstream = ("127.0.0.1", 0)

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, headers, body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _upstream(self, method: str, path: str, body: bytes, headers: dict):
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _forward(self) -> None:
        body = self._body()
        layout = _LAYOUT.match(self.path)
        if layout and self.command == "GET":
            text = json.dumps({"kind": "storage#storageLayout", "bucket": layout.group(1)})
            self._reply(200, [("Content-Type", "application/json")], text.encode())
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if (
            self.command == "POST"
            and not body
            and self.path.startswith("/upload/")
            and "uploadType=media" in self.path
        ):
            self._empty_upload(headers)
            return
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        status, got, data = self._upstream(self.command, self.path, body, headers)
        out = []
        for key, value in got:
            if key.lower() in _HOP_BY_HOP:
                continue
            if key.lower() == "location" and value.startswith("http://"):
                value = "https://" + value[len("http://") :]
            out.append((key, value))
        self._reply(status, out, data)

    def _empty_upload(self, headers: dict) -> None:
        path = self.path.replace("uploadType=media", "uploadType=resumable")
        headers = dict(headers, **{"Content-Length": "0", "Content-Type": "application/json"})
        status, got, _ = self._upstream("POST", path, b"", headers)
        location = dict((k.lower(), v) for k, v in got).get("location")
        if status != 200 or not location:
            self._reply(status, [], b"")
            return
        status, _, data = self._upstream(
            "PUT", "/" + location.split("/", 3)[3], b"", {"Content-Length": "0"}
        )
        self._reply(status, [("Content-Type", "application/json")], data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


class _Outer(BaseHTTPRequestHandler):
    """The proxy itself: CONNECT, then TLS, then :class:`_Inner`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_CONNECT(self) -> None:
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.wfile.flush()
        try:
            tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            self.close_connection = True
            return
        _Inner(tls, self.client_address, self.server)
        self.close_connection = True


def main(argv: list[str]) -> None:
    upstream_port, cert, key = argv
    _Inner.upstream = ("127.0.0.1", int(upstream_port))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Outer)
    server.daemon_threads = True
    server.tls = tls
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
