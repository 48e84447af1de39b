"""TLS for agor-relay: the server's context (reloadable), certificates, fingerprints and pins.

* `server_context(cert, key)`: TLS ≥ 1.2 (1.3 preferred by OpenSSL), forward-secret AEAD ciphers
  only; a key that does not match its certificate is refused with one line.
* `ReloadableContext.reload()`: SIGHUP. The new pair is loaded into a scratch context first, so a bad
  pair is rejected and the old one keeps serving; a good pair is loaded into the live context, which
  new handshakes use (open connections keep theirs).
* `make_certificate(hosts)`: self-signed ECDSA P-256 with SAN, SKI and AKI (Python 3.13's
  VERIFY_X509_STRICT refuses a certificate without AKI).
* Pins: agor's (SHA-256 of the DER certificate, hex) and an SPKI pin (`sha256/` + base64 of the
  SHA-256 of the public key, OkHttp's format), which survives re-issuing with the same key.
* `KnownHosts`: the client's pins, one line per relay (`[host]:port sha256/SPKI CERT-SHA256 CERT-B64`),
  ssh's known_hosts in spirit. The whole certificate is kept so that a client can make it the only
  trust anchor of the connection that carries the token: the pin is enforced by TLS itself.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agor_systemd.config import config_home
from agor_systemd.errors import AgorError
from agor_systemd.files import atomic_write

CERT_DAYS = 825  # what browsers accept for a TLS server certificate at most
# forward-secret AEAD suites for TLS 1.2 (TLS 1.3's are all of that kind and not set here)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TLSError(AgorError):
    """A certificate or key that cannot be used, named."""


def _load_pair(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    for path, what in ((cert, "certificate"), (key, "key")):
        if not path.is_file():
            raise TLSError(f"{path}: no such {what} file (make one with `agor-relay cert --host NAME`)")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        reason = "the key does not match the certificate" if "mismatch" in str(e) else (e.reason or str(e))
        raise TLSError(f"cannot use {cert} with {key}: {reason}") from None
    except OSError as e:
        raise TLSError(f"cannot read {e.filename or cert}: {e.strerror}") from None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_pair(context, cert, key)
    return context


class ReloadableContext:
    """The server's context and the files it came from; `reload` after the files were replaced."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.context = server_context(cert, key)

    def reload(self) -> str:
        """Load the files again; TLSError (the old pair still in use) if the new pair is bad."""
        server_context(self.cert, self.key)  # the check: raises before the live context is touched
        _load_pair(self.context, self.cert, self.key)
        return certificate_summary(self.cert.read_bytes())


# -- certificates ------------------------------------------------------------------------------------


def make_certificate(hosts: list[str], days: int = CERT_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM): self-signed ECDSA P-256 for `hosts` (names or IPs)."""
    if not hosts:
        raise TLSError("give at least one --host: the name or address controllers connect to")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise TLSError(f"--host {host!r} is neither a host name nor an IP address") from None
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_certificate(cert_path: Path, key_path: Path, hosts: list[str], force: bool = False) -> None:
    """The pair, each file written atomically; the key 0600 from the start (never readable by others)."""
    for path in (cert_path, key_path):
        if path.exists() and not force:
            raise TLSError(f"{path} exists; --force replaces it (then `systemctl --user reload agor-relay`)")
    cert_pem, key_pem = make_certificate(hosts)
    atomic_write(key_path, key_pem.decode(), mode=0o600)
    atomic_write(cert_path, cert_pem.decode(), mode=0o644)


def der_of_pem(pem: bytes) -> bytes:
    try:
        return ssl.PEM_cert_to_DER_cert(pem.decode("ascii", "replace"))
    except ValueError:
        raise TLSError("not a PEM certificate") from None


def certificate_pin(der: bytes) -> str:
    """agor's pin: SHA-256 of the DER certificate, hex (changes with every new certificate)."""
    return hashlib.sha256(der).hexdigest()


def spki_pin(der: bytes) -> str:
    """`sha256/<base64>` of the certificate's SubjectPublicKeyInfo (survives re-issuing, same key)."""
    public = x509.load_der_x509_certificate(der).public_key()
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def certificate_summary(pem: bytes) -> str:
    der = der_of_pem(pem)
    return f"{spki_pin(der)} (certificate sha256 {certificate_pin(der)})"


# -- the client's pins ---------------------------------------------------------------------------------


def default_known_hosts() -> Path:
    return config_home() / "agor" / "relay_known_hosts"


@dataclass(frozen=True)
class Pin:
    host: str  # "[host]:port"
    spki: str
    certificate: str  # agor's pin
    der: bytes
    line: int


def host_key(host: str, port: int) -> str:
    return f"[{host}]:{port}"


class KnownHosts:
    """The pins file: read each time (another process may have added a pin), written atomically."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_known_hosts()

    def pins(self) -> list[Pin]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        pins = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if len(words) != 4 or line.startswith("#"):
                continue
            try:
                der = base64.b64decode(words[3], validate=True)
            except ValueError:
                raise TLSError(f"{self.path}:{number}: the certificate is not base64; remove the line") from None
            pins.append(Pin(words[0], words[1], words[2], der, number))
        return pins

    def find(self, host: str, port: int) -> Pin | None:
        key = host_key(host, port)
        return next((pin for pin in self.pins() if pin.host == key), None)

    def _write(self, lines: list[str]) -> None:
        atomic_write(self.path, "".join(line + "\n" for line in lines), mode=0o600)

    def _lines_without(self, key: str) -> tuple[list[str], bool]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return [], False
        kept = [line for line in lines if line.split()[:1] != [key]]
        return kept, len(kept) != len(lines)

    def add(self, host: str, port: int, der: bytes) -> Pin:
        key = host_key(host, port)
        lines, _ = self._lines_without(key)
        entry = f"{key} {spki_pin(der)} {certificate_pin(der)} {base64.b64encode(der).decode()}"
        self._write([*lines, entry])
        pin = self.find(host, port)
        assert pin is not None
        return pin

    def forget(self, host: str, port: int) -> bool:
        lines, removed = self._lines_without(host_key(host, port))
        if removed:
            self._write(lines)
        return removed


def pinned_client_context(der: bytes) -> ssl.SSLContext:
    """A client context whose only trust anchor is the pinned certificate: a relay presenting any
    other certificate fails the handshake, before a byte of the WebSocket request (the token) is sent.
    Host names are not checked: the pin is the identity (as ssh's known_hosts)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a pinned leaf of a CA-issued chain anchors too
    context.load_verify_locations(cadata=der)
    return context


def probe_context() -> ssl.SSLContext:
    """For reading a relay's certificate only (first use, re-issue check); never carries the token."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def file_mode_problem(path: Path) -> str | None:
    """A token or key file others can read, worded; None when it is private."""
    mode = os.stat(path).st_mode
    return f"{path} is readable by others (mode {mode & 0o777:o}); chmod 600 it" if mode & 0o077 else None
