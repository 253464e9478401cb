"""The admin listener's resources: /healthz, /readyz, /metrics, /status and the page at /.

Only GET and HEAD; nothing is cached (``Cache-Control: no-store``); the HTML page may load
nothing from anywhere (``Content-Security-Policy``). Admin requests are not access-logged
(probes and scrapes every few seconds would drown the tracking traffic). /metrics is gzipped
for clients that accept it (Prometheus does): with thousands of domains it shrinks ten-fold.
/status and the page take ``?q=`` (a substring of domain names), ``?problems=1``, ``?page=``
and ``?per_page=`` (``trackingproxy.admin.listing``); a bad value is a 400 saying which.
The page's charts come from a ``history.History`` of the process's counters: given to
``admin_resource``, or else made by ``AdminSite`` on its clock; the site starts and stops it
with its port.
"""

from __future__ import annotations

import gzip
import json

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from trackingproxy.admin.history import History, counters_of
from trackingproxy.admin.listing import DEFAULT_PER_PAGE, DomainQuery, QueryError
from trackingproxy.admin.page import PROBLEMS_SHOWN, render_page
from trackingproxy.admin.status import StatusSource

__all__ = ["AdminSite", "admin_resource"]

_CSP = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'"


def _send(request: Request, code: int, content_type: bytes, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


_TEXT = b"text/plain; charset=utf-8"


def _gzip_accepted(request: Request) -> bool:
    """Whether the client takes a gzip body (``Accept-Encoding: gzip``, not ``gzip;q=0``)."""
    header = request.getHeader(b"accept-encoding") or b""
    for item in header.lower().split(b","):
        coding, _, params = item.partition(b";")
        if coding.strip() != b"gzip":
            continue
        name, _, value = params.strip().partition(b"=")
        try:
            return name.strip() != b"q" or float(value) > 0
        except ValueError:
            return False
    return False


def _bad_query(request: Request, error: QueryError) -> bytes:
    return _send(request, http.BAD_REQUEST, _TEXT, f"400 Bad Request: {error}\n".encode())


class _Endpoint(Resource):
    """A leaf answering GET and HEAD; other methods get 405."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _send(request, http.NOT_ALLOWED, _TEXT, b"405 Method Not Allowed\n")
        return super().render(request)  # type: ignore[no-any-return]


class _Root(Resource):
    """The admin root: the page at /, the endpoints below it, 404 for anything else.

    @ivar source: what the endpoints report on.
    @ivar history: the last hour for the page's charts (None until ``AdminSite`` makes one).
    """

    def __init__(self, source: StatusSource, history: History | None) -> None:
        super().__init__()
        self.source = source
        self.history = history

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


class _NotFound(_Endpoint):
    def render_GET(self, request: Request) -> bytes:
        return _send(request, http.NOT_FOUND, _TEXT, b"404 Not Found\n")


class Healthz(_Endpoint):
    """200 while the process serves requests at all."""

    def render_GET(self, request: Request) -> bytes:
        return _send(request, 200, _TEXT, b"ok\n")


class Readyz(_Endpoint):
    """200 once every listener is up and every domain has a valid certificate; else 503 with
    one reason per line."""

    def __init__(self, source: StatusSource) -> None:
        super().__init__()
        self._source = source

    def render_GET(self, request: Request) -> bytes:
        ready, reasons = self._source.ready()
        if ready:
            return _send(request, 200, _TEXT, b"ready\n")
        text = "not ready:\n" + "".join(f"{r}\n" for r in reasons)
        return _send(request, http.SERVICE_UNAVAILABLE, _TEXT, text.encode("utf-8"))


class Metrics(_Endpoint):
    """The registry in Prometheus text format."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        body = generate_latest(self._registry)
        request.setHeader(b"vary", b"accept-encoding")
        if _gzip_accepted(request):
            body = gzip.compress(body, compresslevel=6, mtime=0)
            request.setHeader(b"content-encoding", b"gzip")
        return _send(request, 200, CONTENT_TYPE_LATEST.encode("ascii"), body)


class Status(_Endpoint):
    """The snapshot as JSON (for scripts): every domain, or with ``?q=``/``?page=``/
    ``?per_page=``/``?problems=1`` the page they select (and as many problems)."""

    def __init__(self, source: StatusSource) -> None:
        super().__init__()
        self._source = source

    def render_GET(self, request: Request) -> bytes:
        try:
            query = DomainQuery.from_args(request.args or {})
        except QueryError as e:
            return _bad_query(request, e)
        snapshot = self._source.snapshot(query, problem_limit=query.per_page)
        body = json.dumps(snapshot, indent=2, sort_keys=True).encode() + b"\n"
        return _send(request, 200, b"application/json", body)


class Page(_Endpoint):
    """The HTML status page (for people): problems first, then one page of the domains
    (``?q=``, ``?problems=1``, ``?page=``; a page past the last shows the last)."""

    def __init__(self, source: StatusSource, root: _Root) -> None:
        super().__init__()
        self._source = source
        self._root = root

    def render_GET(self, request: Request) -> bytes:
        try:
            query = DomainQuery.from_args(request.args or {}, default_per_page=DEFAULT_PER_PAGE)
        except QueryError as e:
            return _bad_query(request, e)
        request.setHeader(b"content-security-policy", _CSP)
        snapshot = self._source.snapshot(query, problem_limit=PROBLEMS_SHOWN, clamp=True)
        history = self._root.history
        page = render_page(snapshot, history.window() if history is not None else None)
        return _send(request, 200, b"text/html; charset=utf-8", page)


def admin_resource(
    source: StatusSource, registry: CollectorRegistry, history: History | None = None
) -> Resource:
    root = _Root(source, history)
    root.putChild(b"", Page(source, root))
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(source))
    root.putChild(b"metrics", Metrics(registry))
    root.putChild(b"status", Status(source))
    return root


class AdminSite(Site):
    """A Site that does not write an access log line per probe or scrape, and keeps the
    page's history running while it listens.

    @ivar history: the charts' history of an ``admin_resource`` root (made here on
        ``reactor`` from the source's metrics when the root has none), else None.
    """

    noisy = False

    def __init__(self, resource: Resource, reactor: IReactorTime) -> None:
        super().__init__(resource, reactor=reactor)
        self.displayTracebacks = False
        self.history: History | None = None
        if isinstance(resource, _Root):
            if resource.history is None:
                resource.history = History(reactor, counters_of(resource.source.metrics))
            self.history = resource.history

    def startFactory(self) -> None:
        super().startFactory()
        if self.history is not None:
            self.history.start()

    def stopFactory(self) -> None:
        if self.history is not None:
            self.history.stop()
        super().stopFactory()

    def log(self, request: http.Request) -> None:
        pass
