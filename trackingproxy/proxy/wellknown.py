"""Files served as-is under ``/.well-known/`` (deep-link files such as
``apple-app-site-association`` and ``assetlinks.json``).

The directory is read once at start-up (and on reload) into memory, so a request never touches
the disk and only files that were in the directory can ever be served: no path traversal.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from attrs import frozen

from trackingproxy.errors import ConfigError

MAX_FILE_SIZE = 1024 * 1024
MAX_FILES = 1000

_JSON_NAMES = {"apple-app-site-association", "apple-developer-merchantid-domain-association"}


@frozen
class WellKnownFile:
    body: bytes
    content_type: bytes


def content_type_for(name: str) -> bytes:
    base = name.rsplit("/", 1)[-1]
    if base in _JSON_NAMES or base.endswith(".json"):
        return b"application/json"
    guessed, _ = mimetypes.guess_type(base)
    if guessed is None:
        return b"text/plain; charset=utf-8" if "." not in base else b"application/octet-stream"
    if guessed.startswith("text/"):
        return f"{guessed}; charset=utf-8".encode("ascii")
    return guessed.encode("ascii")


def load_well_known(directory: Path) -> dict[bytes, WellKnownFile]:
    """Map request paths (``/.well-known/<relative path>``) to file contents."""
    if not directory.is_dir():
        raise ConfigError(
            f"--well-known-dir {directory}: not a directory; create it or fix the path"
        )
    files: dict[bytes, WellKnownFile] = {}
    try:
        real_root = directory.resolve()
        for path in sorted(directory.rglob("*")):
            if not path.is_file() or any(
                part.startswith(".") for part in path.relative_to(directory).parts
            ):
                continue
            if not path.resolve().is_relative_to(real_root):
                raise ConfigError(
                    f"--well-known-dir: {path} is a link to {path.resolve()}, outside the "
                    "directory; copy the file into the directory instead"
                )
            rel = path.relative_to(directory).as_posix()
            if path.stat().st_size > MAX_FILE_SIZE:
                raise ConfigError(
                    f"--well-known-dir: {path} is larger than 1 MiB; serve large files elsewhere"
                )
            if len(files) >= MAX_FILES:
                raise ConfigError(f"--well-known-dir {directory}: more than {MAX_FILES} files")
            files[b"/.well-known/" + rel.encode("utf-8")] = WellKnownFile(
                path.read_bytes(), content_type_for(rel)
            )
    except OSError as e:
        raise ConfigError(
            f"--well-known-dir {directory}: cannot read it ({e.strerror}); check permissions"
        ) from None
    return files
