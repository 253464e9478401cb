"""A tiny stand-in for spgo.io, SparkPost's tracking endpoint, for ``make demo``.

Serves HTTPS on 127.0.0.1 with the certificate and key given on the command line and answers
like SparkPost does: ``/q/<token>`` (an open) with 200 and a 1x1 GIF, ``/f/<token>`` (a click)
with 302 to a landing page; anything else 404. It prints ``listening on <port>`` once ready.
With ``--record FILE`` it appends one line per request it receives (``METHOD path User-Agent``),
written before the answer, so ``make soak`` can count what reached "SparkPost" (several
stand-ins may append to the same file). Standard library only; run by ``demo/run_demo.py``,
not imported.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

# A transparent 1x1 GIF (44 bytes: the image data block carries one byte of padding).
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00"
    b"\x02\x03\x44\x01\x00\x00;"
)
LANDING = "https://www.example.com/landing?utm_source=trackingproxy-demo"


class Recorder:
    """``--record``: one ``METHOD path User-Agent`` line per request received, flushed at once."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.lock = threading.Lock()

    def record(self, method: str, path: str, user_agent: str) -> None:
        if self.out is None:
            return
        with self.lock:
            self.out.write(f"{method} {path} {user_agent}\n")
            self.out.flush()


RECORDER = Recorder(None)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like spgo.io: the proxy pools connections
    server_version = "spgo-standin"

    def _answer(self, body: bool) -> None:
        RECORDER.record(self.command, self.path, self.headers.get("User-Agent", "-"))
        if self.path.startswith("/q/"):
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.send_header("Cache-Control", "no-cache, max-age=0")
            payload = PIXEL
        elif self.path.startswith("/f/"):
            self.send_response(302)
            self.send_header("Location", LANDING)
            payload = b""
        else:
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            payload = b"not a tracking path\n"
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._answer(body=True)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("standin: " + (format % args) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", required=True, help="PEM certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--record", help="append 'METHOD path UA' per request received to FILE")
    args = parser.parse_args()
    if args.record:
        RECORDER.out = open(args.record, "a", encoding="utf-8")  # noqa: SIM115 (process-long)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
