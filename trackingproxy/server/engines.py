"""Which HTTP/2 engine serves a listener (``--http2-engine``): libnghttp2 when it loads
(`trackingproxy.server.http2_nghttp2`), else the pure-Python ``h2`` state machine
(`trackingproxy.server.http2_python`). The engine modules are imported only here."""

from __future__ import annotations

from trackingproxy.server import nghttp2
from trackingproxy.server.http2 import H2ServerBase

__all__ = ["ENGINES", "choose_engine"]

ENGINES = ("auto", "nghttp2", "python")


def choose_engine(engine: str) -> tuple[type[H2ServerBase], str]:
    """The connection class for ``--http2-engine`` (auto, nghttp2, python) and a line for the
    log saying which one runs. Raises ValueError when nghttp2 is asked for and cannot load."""
    from trackingproxy.server.http2_python import PythonH2Connection

    if engine == "python":
        return PythonH2Connection, "HTTP/2 engine: h2 (pure Python), as configured"
    bound = nghttp2.load()
    if isinstance(bound, str):
        if engine == "nghttp2":
            raise ValueError(f"--http2-engine nghttp2: {bound}")
        return PythonH2Connection, f"HTTP/2 engine: h2 (pure Python), because {bound}"
    from trackingproxy.server.http2_nghttp2 import NativeH2Connection

    return NativeH2Connection, f"HTTP/2 engine: libnghttp2 {bound.version}"
