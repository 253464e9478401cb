"""HTTP-01 tokens shared through the state directory: one flat directory of token files, a
refresh whose work follows the pending tokens (not the configured domains), and everything
else that may lie in the directory (expired, corrupt, foreign, old-layout) handled."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.responder import HTTP01Responder, valid_token

A = "a.example.com"
B = "b.example.com"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
OTHER_TOKEN = "Z" * 43


class SharedDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        base = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, base)
        self.dir = base / "challenges"

    def responder(self, domains: list[str], ttl: float = 600.0) -> HTTP01Responder:
        return HTTP01Responder(domains, self.clock, shared_dir=self.dir, ttl=ttl)

    def count_listings(self) -> list[str]:
        """Patch ``os.listdir`` and ``os.scandir`` to record each directory they list."""
        listed: list[str] = []

        def counting(real: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(path: Any = ".") -> Any:
                listed.append(os.fspath(path))
                return real(path)

            return wrapper

        self.patch(os, "listdir", counting(os.listdir))
        self.patch(os, "scandir", counting(os.scandir))
        return listed

    def test_refresh_work_does_not_follow_the_domains(self) -> None:
        """With 10,000 configured domains and one pending token, a refresh lists one
        directory (the old layout listed one per domain, 10,000 syscalls every tick) and
        still answers the token."""
        domains = [f"d{i}.example.com" for i in range(10_000)]
        self.responder(domains).add(domains[4321], TOKEN, b"ka")
        reader = self.responder(domains)
        listed = self.count_listings()
        reader.refresh()
        self.assertEqual(listed, [os.fspath(self.dir)])
        self.assertEqual(reader.key_authorization(domains[4321], TOKEN), b"ka")

    def test_one_flat_directory_of_private_files(self) -> None:
        """Each pending token is one 0600 file directly in the 0700 directory (no per-domain
        subdirectory), named without the host's characters, and withdrawing removes it."""
        publisher = self.responder([A, B])
        publisher.add(A, TOKEN, b"ka")
        publisher.add(B, TOKEN, b"kb")
        files = sorted(self.dir.iterdir())
        self.assertEqual(len(files), 2)
        for f in files:
            self.assertTrue(f.is_file())
            self.assertEqual(stat.S_IMODE(f.stat().st_mode), 0o600)
            self.assertNotIn("example", f.name)
        self.assertEqual(stat.S_IMODE(self.dir.stat().st_mode), 0o700)
        publisher.remove(A, TOKEN)
        publisher.remove(B, TOKEN)
        self.assertEqual(list(self.dir.iterdir()), [])

    def test_same_token_for_two_hosts(self) -> None:
        """The same token published for two hosts is two answers, each for its own host."""
        publisher = self.responder([A, B])
        publisher.add(A, TOKEN, b"ka")
        publisher.add(B, TOKEN, b"kb")
        reader = self.responder([A, B])
        reader.refresh()
        self.assertEqual(reader.key_authorization(A, TOKEN), b"ka")
        self.assertEqual(reader.key_authorization(B, TOKEN), b"kb")

    def test_longest_host_fits_a_file_name(self) -> None:
        """A 253-character host with a 128-character token is still one short file name
        (a ``<host>@<token>`` name would pass the usual 255-byte limit)."""
        host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
        self.assertEqual(len(host), 253)
        token = "t" * 128
        self.responder([host]).add(host, token, b"ka")
        [token_file] = self.dir.iterdir()
        self.assertLessEqual(len(token_file.name), 161)
        reader = self.responder([host])
        reader.refresh()
        self.assertEqual(reader.key_authorization(host, token), b"ka")

    def test_expired_files_are_deleted(self) -> None:
        """A refresh deletes a token file whose expiry has passed (its publisher died
        before withdrawing it), whoever's host it is, and does not answer it."""
        self.responder([A], ttl=10).add(A, TOKEN, b"ka")
        self.responder([B], ttl=10).add(B, OTHER_TOKEN, b"kb")
        reader = self.responder([A])
        self.clock.advance(11)
        reader.refresh()
        self.assertEqual(list(self.dir.iterdir()), [])
        self.assertIsNone(reader.key_authorization(A, TOKEN))

    def test_hosts_not_configured_are_ignored(self) -> None:
        """A token another process published for a host this one does not serve is not
        answered, and its file is left alone while it is pending; once the host is
        configured here the next refresh answers it."""
        self.responder([A, B]).add(B, TOKEN, b"kb")
        reader = self.responder([A])
        reader.refresh()
        self.assertIsNone(reader.key_authorization(B, TOKEN))
        self.assertEqual(len(list(self.dir.iterdir())), 1)
        reader.set_domains([A, B])
        reader.refresh()
        self.assertEqual(reader.key_authorization(B, TOKEN), b"kb")

    def test_corrupt_partial_and_foreign_entries_are_skipped(self) -> None:
        """A corrupt token file, a temporary file being written, a file whose content names
        another host, a directory with a token-like name and an old-layout per-domain
        subdirectory are all passed over; the good token next to them is answered."""
        publisher = self.responder([A, B])
        publisher.add(A, TOKEN, b"ka")
        [good] = self.dir.iterdir()
        publisher.add(B, OTHER_TOKEN, b"kb")
        [moved] = [f for f in self.dir.iterdir() if f != good]
        data = json.loads(moved.read_bytes())
        data["host"] = A  # names B's digest but claims A: not trusted
        moved.write_text(json.dumps(data))
        corrupt = "C" * 43 + "@" + "0" * 32
        (self.dir / corrupt).write_text('{"host": "a.exa')
        (self.dir / f".{good.name}.x1y2z3.tmp").write_text('{"host": ')
        (self.dir / ("D" * 43 + "@" + "1" * 32)).mkdir()
        (self.dir / A).mkdir()
        (self.dir / A / TOKEN).write_text(json.dumps({"key_authorization": "old",
                                                       "expires": 1e12}))
        (self.dir / "README").write_text("not a token")
        reader = self.responder([A, B])
        reader.refresh()
        self.assertEqual(reader.key_authorization(A, TOKEN), b"ka")
        self.assertIsNone(reader.key_authorization(A, OTHER_TOKEN))
        self.assertIsNone(reader.key_authorization(B, OTHER_TOKEN))
        self.assertIsNone(reader.key_authorization(A, "C" * 43))

    def test_missing_directory(self) -> None:
        """A refresh before anything created the directory answers nothing and raises
        nothing."""
        reader = self.responder([A])
        reader.refresh()
        self.assertIsNone(reader.key_authorization(A, TOKEN))

    def test_withdrawn_elsewhere_stops_being_answered(self) -> None:
        """A token withdrawn by its publisher is no longer answered after the next refresh."""
        publisher = self.responder([A])
        publisher.add(A, TOKEN, b"ka")
        reader = self.responder([A])
        reader.refresh()
        self.assertEqual(reader.key_authorization(A, TOKEN), b"ka")
        publisher.remove(A, TOKEN)
        reader.refresh()
        self.assertIsNone(reader.key_authorization(A, TOKEN))


class TokenTests(SynchronousTestCase):
    def test_valid_token_is_the_whole_string(self) -> None:
        """Only base64url of 16 to 128 characters: a trailing newline, a slash, an ``@`` or a
        dot make it invalid (the token is part of a file name)."""
        self.assertTrue(valid_token(TOKEN))
        self.assertTrue(valid_token("t" * 128))
        for bad in (TOKEN + "\n", "t" * 129, "t" * 15, TOKEN[:-1] + "/", TOKEN + "@x",
                    "." + TOKEN, TOKEN + "="):
            self.assertFalse(valid_token(bad), bad)
