"""The part of libnghttp2's C API the HTTP/2 server uses, bound with cffi in ABI mode (no
compiler needed: the library is opened at run time; Debian/Ubuntu package ``libnghttp2-14``).

`load()` returns the bound library, or the reason it cannot be opened (then the pure-Python
HTTP/2 engine is used). The declarations follow nghttp2.h (1.52); structs the server only
receives pointers to are declared up to the fields it reads.

`callbacks()` gives the session callbacks, made once per process: each C callback finds its
`SessionHandler` (the connection, `trackingproxy.server.http2_nghttp2`) through the cffi handle
passed as the session's ``user_data``. A Python exception in a callback is logged and fails the
session (the connection is closed), never the process.
"""

from __future__ import annotations

import ctypes.util
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Bound", "Callbacks", "SessionHandler", "callbacks", "load"]

log = Logger(namespace="trackingproxy.server.nghttp2")

CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct {
  char *name;
  char *value;
  size_t namelen;
  size_t valuelen;
  uint8_t flags;
} nghttp2_nv;

typedef struct {
  size_t length;
  int32_t stream_id;
  uint8_t type;
  uint8_t flags;
  uint8_t reserved;
} nghttp2_frame_hd;

typedef union {
  nghttp2_frame_hd hd;
} nghttp2_frame;

typedef union {
  int fd;
  void *ptr;
} nghttp2_data_source;

typedef ssize_t (*nghttp2_data_source_read_callback)(
    nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
    uint32_t *data_flags, nghttp2_data_source *source, void *user_data);

typedef struct {
  nghttp2_data_source source;
  nghttp2_data_source_read_callback read_callback;
} nghttp2_data_provider;

typedef struct {
  int32_t settings_id;
  uint32_t value;
} nghttp2_settings_entry;

typedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_data_chunk_recv_callback)(nghttp2_session *session,
    uint8_t flags, int32_t stream_id, const char *data, size_t len, void *user_data);
typedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *session,
    int32_t stream_id, uint32_t error_code, void *user_data);
typedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_header_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, const char *name, size_t namelen,
    const char *value, size_t valuelen, uint8_t flags, void *user_data);
typedef int (*nghttp2_on_invalid_header_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, const char *name, size_t namelen,
    const char *value, size_t valuelen, uint8_t flags, void *user_data);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks);
void nghttp2_session_callbacks_set_on_frame_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_frame_recv_callback cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_data_chunk_recv_callback cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback cb);
void nghttp2_session_callbacks_set_on_begin_headers_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_begin_headers_callback cb);
void nghttp2_session_callbacks_set_on_header_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_header_callback cb);
void nghttp2_session_callbacks_set_on_invalid_header_callback(
    nghttp2_session_callbacks *cbs, nghttp2_on_invalid_header_callback cb);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option,
    uint64_t burst, uint64_t rate);

int nghttp2_session_server_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data,
    const nghttp2_option *option);
void nghttp2_session_del(nghttp2_session *session);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const uint8_t **data_ptr);
ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const uint8_t *in, size_t inlen);
int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);
int nghttp2_session_terminate_session(nghttp2_session *session, uint32_t error_code);

int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
    const nghttp2_settings_entry *iv, size_t niv);
int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags,
    int32_t stream_id, uint32_t error_code);
int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
    uint32_t error_code, const uint8_t *opaque_data, size_t opaque_data_len);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);
const char *nghttp2_strerror(int lib_error_code);

typedef struct {
  int age;
  int version_num;
  const char *version_str;
  const char *proto_str;
} nghttp2_info;
nghttp2_info *nghttp2_version(int least_version);
"""

# Constants from nghttp2.h.
DATA, HEADERS, RST_STREAM, GOAWAY = 0x0, 0x1, 0x3, 0x7
FLAG_NONE, FLAG_END_STREAM = 0x0, 0x1
DATA_FLAG_EOF = 0x1
ERR_DEFERRED = -508
ERR_TEMPORAL_CALLBACK_FAILURE = -521
ERR_CALLBACK_FAILURE = -902
# More outbound ACKs (PING, SETTINGS) and RST_STREAMs queued than the library allows (1000 by
# default): the client sends faster than it reads (RFC 9113 10.5).
ERR_FLOODED = -904
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x2, 0xB
MIN_VERSION = 0x013400  # 1.52.0: the RST_STREAM rate limit and the CONTINUATION limit


@dataclass(frozen=True)
class Bound:
    """The cffi ``ffi`` and the opened library."""

    ffi: Any
    lib: Any
    version: str


_loaded: Bound | str | None = None


def load() -> Bound | str:
    """The bound library, or the reason it cannot be used (a one-line message)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> Bound | str:
    try:
        import cffi
    except ImportError:
        return "the cffi package is not installed"
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    names = ["libnghttp2.so.14", ctypes.util.find_library("nghttp2")]
    errors = []
    for name in names:
        if not name:
            continue
        try:
            lib: Any = ffi.dlopen(name)
        except OSError as e:
            errors.append(str(e))
            continue
        try:
            info = lib.nghttp2_version(MIN_VERSION)
            lib.nghttp2_option_set_stream_reset_rate_limit  # noqa: B018 (present?)
            lib.nghttp2_option_set_max_continuations  # noqa: B018
        except AttributeError as e:
            return f"libnghttp2 is too old (needs 1.52 with the 2024 fixes): {e}"
        if info == ffi.NULL:
            return "libnghttp2 is older than 1.52"
        version = ffi.string(info.version_str)
        if isinstance(version, bytes):
            version = version.decode("ascii", "replace")
        return Bound(ffi, lib, version)
    return "libnghttp2 not found (Debian/Ubuntu: apt-get install libnghttp2-14): " + "; ".join(
        errors
    )


class SessionHandler(Protocol):
    """What the session callbacks call (the connection); the ints are nghttp2 return codes."""

    def on_begin_headers(self, stream_id: int) -> None: ...
    def on_header(self, stream_id: int, name: bytes, value: bytes) -> int: ...
    def on_invalid_header(self, stream_id: int) -> int: ...
    def on_frame(self, kind: int, flags: int, stream_id: int) -> None: ...
    def on_data_chunk(self, stream_id: int, data: bytes) -> None: ...
    def on_stream_close(self, stream_id: int) -> None: ...
    def on_read(self, stream_id: int, buf: Any, length: int, data_flags: Any) -> int: ...


class Callbacks:
    """The bound library, the session callbacks and options, and the data provider."""

    def __init__(self, bound: Bound) -> None:
        ffi, lib = bound.ffi, bound.lib
        self.ffi, self.lib, self.version = ffi, lib, bound.version
        fail = ERR_CALLBACK_FAILURE
        cb = ffi.callback
        # Kept as attributes: the C side holds raw pointers to them.
        self.on_begin_headers = cb(
            "nghttp2_on_begin_headers_callback", _on_begin_headers, error=fail, onerror=_on_error
        )
        self.on_header = cb("nghttp2_on_header_callback", _on_header, error=fail, onerror=_on_error)
        self.on_invalid_header = cb(
            "nghttp2_on_invalid_header_callback", _on_invalid_header, error=fail, onerror=_on_error
        )
        self.on_frame_recv = cb(
            "nghttp2_on_frame_recv_callback", _on_frame_recv, error=fail, onerror=_on_error
        )
        self.on_data_chunk = cb(
            "nghttp2_on_data_chunk_recv_callback", _on_data_chunk, error=fail, onerror=_on_error
        )
        self.on_stream_close = cb(
            "nghttp2_on_stream_close_callback", _on_stream_close, error=fail, onerror=_on_error
        )
        self.read = cb("nghttp2_data_source_read_callback", _read, error=fail, onerror=_on_error)
        pp = ffi.new("nghttp2_session_callbacks **")
        if lib.nghttp2_session_callbacks_new(pp) != 0:
            raise MemoryError("nghttp2_session_callbacks_new")
        self.callbacks = ffi.gc(pp[0], lib.nghttp2_session_callbacks_del)
        cbs = self.callbacks
        lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, self.on_begin_headers)
        lib.nghttp2_session_callbacks_set_on_header_callback(cbs, self.on_header)
        lib.nghttp2_session_callbacks_set_on_invalid_header_callback(cbs, self.on_invalid_header)
        lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, self.on_frame_recv)
        lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, self.on_data_chunk)
        lib.nghttp2_session_callbacks_set_on_stream_close_callback(cbs, self.on_stream_close)
        op = ffi.new("nghttp2_option **")
        if lib.nghttp2_option_new(op) != 0:
            raise MemoryError("nghttp2_option_new")
        self.option = ffi.gc(op[0], lib.nghttp2_option_del)
        self.provider = ffi.new("nghttp2_data_provider *")
        self.provider.read_callback = self.read


_callbacks: Callbacks | None = None


def callbacks() -> Callbacks:
    """The process's callbacks (raises RuntimeError with the reason if the library is missing)."""
    global _callbacks
    if _callbacks is None:
        bound = load()
        if isinstance(bound, str):
            raise RuntimeError(bound)
        _callbacks = Callbacks(bound)
    return _callbacks


# -- the C callbacks (user_data is the handler's handle) -------------------------------------
def _handler(user_data: Any) -> SessionHandler:
    return _callbacks.ffi.from_handle(user_data)  # type: ignore[union-attr,no-any-return]


def _on_begin_headers(session: Any, frame: Any, user_data: Any) -> int:
    _handler(user_data).on_begin_headers(frame.hd.stream_id)
    return 0


def _on_header(
    session: Any,
    frame: Any,
    name: Any,
    namelen: int,
    value: Any,
    valuelen: int,
    flags: int,
    user_data: Any,
) -> int:
    unpack = _callbacks.ffi.unpack  # type: ignore[union-attr]
    return _handler(user_data).on_header(
        frame.hd.stream_id, unpack(name, namelen), unpack(value, valuelen)
    )


def _on_invalid_header(
    session: Any,
    frame: Any,
    name: Any,
    namelen: int,
    value: Any,
    valuelen: int,
    flags: int,
    user_data: Any,
) -> int:
    return _handler(user_data).on_invalid_header(frame.hd.stream_id)


def _on_frame_recv(session: Any, frame: Any, user_data: Any) -> int:
    hd = frame.hd
    _handler(user_data).on_frame(hd.type, hd.flags, hd.stream_id)
    return 0


def _on_data_chunk(
    session: Any, flags: int, stream_id: int, data: Any, length: int, user_data: Any
) -> int:
    data_bytes = _callbacks.ffi.unpack(data, length)  # type: ignore[union-attr]
    _handler(user_data).on_data_chunk(stream_id, data_bytes)
    return 0


def _on_stream_close(session: Any, stream_id: int, error_code: int, user_data: Any) -> int:
    _handler(user_data).on_stream_close(stream_id)
    return 0


def _read(
    session: Any,
    stream_id: int,
    buf: Any,
    length: int,
    data_flags: Any,
    source: Any,
    user_data: Any,
) -> int:
    return _handler(user_data).on_read(stream_id, buf, length, data_flags)


def _on_error(exception: type[BaseException], value: BaseException, tb: Any) -> None:
    log.failure("HTTP/2 callback failed", Failure(value, exception, tb))
