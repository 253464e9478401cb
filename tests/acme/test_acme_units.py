"""Responder, settings, local CA and problem explanations, without a network."""

from __future__ import annotations

import datetime
import shutil
import stat
import tempfile
from pathlib import Path

from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trackingproxy.acme.client import _profiles
from trackingproxy.acme.localca import LocalCA
from trackingproxy.acme.obtainer import ObtainRequest
from trackingproxy.acme.problems import RegistrationFailed, explain
from trackingproxy.acme.responder import HTTP01Responder
from trackingproxy.acme.settings import AcmeSettings, build_acme, choose_state_dir, key_generator
from trackingproxy.errors import ConfigError
from trackingproxy.proxy.challenges import NoChallenges
from trackingproxy.tls.certificates import parse_pem
from trackingproxy.tls.sni import SNIContextMap

A = "a.example.com"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


def tmpdir(case: SynchronousTestCase) -> Path:
    d = Path(tempfile.mkdtemp())
    case.addCleanup(shutil.rmtree, d)
    return d


class ResponderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = tmpdir(self) / "challenges"
        self.responder = HTTP01Responder([A], self.clock, shared_dir=self.dir, ttl=600)

    def test_answers_only_while_published(self) -> None:
        """A published token is answered (any host case) until removed."""
        self.responder.add(A, TOKEN, b"ka")
        self.assertEqual(self.responder.key_authorization("A.example.com.", TOKEN), b"ka")
        self.responder.remove(A, TOKEN)
        self.assertIsNone(self.responder.key_authorization(A, TOKEN))

    def test_refuses_other_hosts_and_bad_tokens(self) -> None:
        """Unconfigured hosts and non-base64url tokens are never answered nor accepted."""
        self.responder.add(A, TOKEN, b"ka")
        self.assertIsNone(self.responder.key_authorization("evil.example.com", TOKEN))
        self.assertIsNone(self.responder.key_authorization(A, "../../etc/passwd"))
        self.assertRaises(ValueError, self.responder.add, A, "a/b" * 10, b"x")
        self.assertRaises(ValueError, self.responder.add, "evil.example.com", TOKEN, b"x")

    def test_expires(self) -> None:
        """A token nobody withdrew stops being answered after its ttl."""
        self.responder.add(A, TOKEN, b"ka")
        self.clock.advance(601)
        self.assertIsNone(self.responder.key_authorization(A, TOKEN))

    def test_shared_between_processes_on_refresh(self) -> None:
        """Another responder on the same directory answers after its timer refresh, not before."""
        other = HTTP01Responder([A], self.clock, shared_dir=self.dir, refresh_interval=1.0)
        other.start()
        self.addCleanup(other.stop)
        self.responder.add(A, TOKEN, b"ka")
        self.assertIsNone(other.key_authorization(A, TOKEN))
        self.clock.advance(1)
        self.assertEqual(other.key_authorization(A, TOKEN), b"ka")
        self.responder.remove(A, TOKEN)
        self.clock.advance(1)
        self.assertIsNone(other.key_authorization(A, TOKEN))
        self.assertEqual(other.propagation_delay, 1.5)

    def test_token_files_private(self) -> None:
        """Token files are 0600 in a 0700 directory."""
        self.responder.add(A, TOKEN, b"ka")
        [token_file] = self.dir.iterdir()
        self.assertEqual(stat.S_IMODE(token_file.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.dir.stat().st_mode), 0o700)


class SettingsTests(SynchronousTestCase):
    def assertConfigError(self, settings: AcmeSettings, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as e:
            settings.validate()
        for fragment in fragments:
            self.assertIn(fragment, str(e.exception))
        self.assertNotIn("\n", str(e.exception))

    def test_aliases(self) -> None:
        """Aliases resolve to directory URLs; a URL is kept; local is local."""
        self.assertEqual(
            AcmeSettings(directory="letsencrypt-staging").directory_url,
            "https://acme-staging-v02.api.letsencrypt.org/directory",
        )
        self.assertEqual(AcmeSettings(directory="https://x/dir").directory_url, "https://x/dir")
        self.assertTrue(AcmeSettings(directory="local").is_local)
        AcmeSettings().validate()

    def test_errors_name_the_fix(self) -> None:
        """Each bad option gives one line naming the option and the fix."""
        self.assertConfigError(AcmeSettings(email="nope"), "--email", "ops@example.com")
        self.assertConfigError(AcmeSettings(directory="ftp://x"), "--acme-directory")
        self.assertConfigError(AcmeSettings(directory="zerossl"), "--eab-kid", "ZeroSSL")
        self.assertConfigError(AcmeSettings(eab_kid="k"), "--eab-hmac-key")
        self.assertConfigError(AcmeSettings(eab_kid="k", eab_hmac_key="**"), "base64url")
        self.assertConfigError(AcmeSettings(key_type="dsa"), "--key-type", "ecdsa-p256")
        self.assertConfigError(AcmeSettings(ca_bundle=Path("/nonexistent")), "--acme-ca-bundle")
        self.assertConfigError(AcmeSettings(profile="a b"), "--acme-profile")
        AcmeSettings(directory="zerossl", eab_kid="k", eab_hmac_key="c2VjcmV0").validate()

    def test_secret_not_in_repr(self) -> None:
        """The EAB HMAC key never shows in the settings' repr."""
        self.assertNotIn("c2VjcmV0", repr(AcmeSettings(eab_kid="k", eab_hmac_key="c2VjcmV0")))

    def test_key_types(self) -> None:
        """Every key type makes the right kind of key."""
        self.assertIsInstance(key_generator("ecdsa-p384")(), ec.EllipticCurvePrivateKey)
        rsa_key = key_generator("rsa2048")()
        assert isinstance(rsa_key, rsa.RSAPrivateKey)
        self.assertEqual(rsa_key.key_size, 2048)

    def test_state_dir_fallback(self) -> None:
        """An unwritable default falls back to the second directory, created 0700."""
        base = tmpdir(self)
        blocked = base / "file"
        blocked.write_text("")
        chosen = choose_state_dir(AcmeSettings(), default=blocked / "x", fallback=base / "st")
        self.assertEqual(chosen, base / "st")
        self.assertEqual(stat.S_IMODE(chosen.stat().st_mode), 0o700)
        with self.assertRaises(ConfigError):
            choose_state_dir(AcmeSettings(state_dir=blocked / "x"))

    def test_no_acme(self) -> None:
        """--no-acme builds an empty service and a responder that answers nothing."""
        parts = build_acme(AcmeSettings(no_acme=True), [A], [], SNIContextMap([A]), Clock())
        self.assertIsInstance(parts.responder, NoChallenges)
        self.assertEqual(list(parts.service), [])  # type: ignore[call-overload]
        self.assertEqual((parts.issuer, parts.follow_domains), (None, ()))


class LocalCATests(SynchronousTestCase):
    def test_signs_and_keeps_root(self) -> None:
        """The local CA writes its root once (key 0600) and signs leaves that chain to it."""
        clock = Clock()
        clock.advance(datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC).timestamp())
        state = tmpdir(self)
        ca = LocalCA(state, clock)
        ca.start()
        root_pem = (state / "local-ca.pem").read_bytes()
        self.assertEqual(stat.S_IMODE((state / "local-ca" / "root-key.pem").stat().st_mode), 0o600)
        key = ec.generate_private_key(ec.SECP256R1())
        request = ObtainRequest(name=A, key=key, save_order=lambda o: None)  # type: ignore[arg-type,return-value]
        chain = self.successResultOf(ca.obtain(request))
        from cryptography.hazmat.primitives import serialization

        cert = parse_pem(chain, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), "test")
        root = x509.load_pem_x509_certificate(root_pem)
        cert.leaf.verify_directly_issued_by(root)
        self.assertTrue(cert.covers(A))
        LocalCA(state, clock).start()
        self.assertEqual((state / "local-ca.pem").read_bytes(), root_pem)


class ProblemTests(SynchronousTestCase):
    def test_problem_document_one_line(self) -> None:
        """An ACME problem becomes one line with type, detail, subproblems and a fix."""
        error = messages.Error(  # type: ignore[call-arg]
            typ="urn:ietf:params:acme:error:compound", detail="Errors during validation",
            subproblems=(messages.Error(  # type: ignore[call-arg]
                typ="urn:ietf:params:acme:error:connection",
                detail="203.0.113.9: Fetching http://a.example.com/.well-known/x:\nrefused",
                identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=A),
            ),),
        )
        now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
        result = explain(error, A, "https://ca/dir", now)
        self.assertNotIn("\n", result.message)
        self.assertIn("compound: Errors during validation", result.message)
        self.assertIn(f"{A}: connection: 203.0.113.9", result.message)
        self.assertEqual(result.problem_type, "compound")

    def test_rate_limit_retry_after(self) -> None:
        """rateLimited keeps the Retry-After of the response."""
        error = messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="slow")  # type: ignore[call-arg]
        error.retry_after_header = "3600"
        now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
        result = explain(error, A, "https://ca/dir", now)
        self.assertEqual(result.retry_after, now + datetime.timedelta(hours=1))
        self.assertIn("rate-limits", result.message)

    def test_registration_refusals_name_the_eab_options(self) -> None:
        """A refused registration says so; EAB refusals name --eab-kid/--eab-hmac-key rather
        than blaming DNS, and a missing EAB says it is required."""
        now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
        unauthorized = messages.Error.with_code("unauthorized", detail="EAB JWS verification")
        required = messages.Error.with_code("externalAccountRequired", detail="no EAB")
        with_eab = explain(RegistrationFailed(unauthorized, eab=True), A, "https://ca/dir", now)
        self.assertIn("registering an ACME account at https://ca/dir failed", with_eab.message)
        self.assertIn("--eab-kid and --eab-hmac-key", with_eab.message)
        self.assertNotIn("DNS", with_eab.message)
        missing = explain(RegistrationFailed(required, eab=False), A, "https://ca/dir", now)
        self.assertIn("needs External Account Binding", missing.message)
        self.assertEqual(missing.problem_type, "externalAccountRequired")
        plain = explain(RegistrationFailed(unauthorized, eab=False), A, "https://ca/dir", now)
        self.assertNotIn("DNS", plain.message)


class DirectoryTests(SynchronousTestCase):
    def test_directory_without_meta(self) -> None:
        """A directory without the optional ``meta`` object offers no profiles (no crash)."""
        directory = messages.Directory({"newOrder": "https://ca/new-order"})
        self.assertEqual(_profiles(directory), {})
