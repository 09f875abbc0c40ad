"""The files a Flower deployment needs for TLS and SuperNode authentication: make them, and
check them before a Flower process is started with them.

Formats are the ones Flower 1.42 itself loads:
- flower-superlink serves HTTPS with uvicorn (Python's ssl) from --ssl-certfile and
  --ssl-keyfile, and hands all three files to its gRPC servers
  (flwr/superlink/cli/flower_superlink.py); both take an EC P-384 certificate and an
  unencrypted PKCS#8 PEM key.
- flower-supernode reads --auth-supernode-private-key with `load_ssh_private_key` and
  requires an EC key (flwr/supernode/cli/flower_supernode.py), so a site's private key is
  in OpenSSH format; a PKCS#8 PEM key is refused there.
- `flwr supernode register` reads the public key with `load_ssh_public_key` and requires a
  NIST EC curve (flwr/cli/supernode/register.py), so the public key is an OpenSSH line.
"""

from __future__ import annotations

import ipaddress
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import CohortInputError
from server.rundir import write_bytes_atomic

# Where the SuperLink's SuperExec, the coordinator's flwr and the front door reach it;
# every SuperLink certificate covers both: the address (Python's TLS checks IP SANs) and
# the name (nginx checks an upstream's certificate against a DNS name only).
LOOPBACK = "127.0.0.1"
LOOPBACK_NAME = "localhost"
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_CA_COMMON_NAME = "Cohort federation CA"
_CLOCK_SKEW = timedelta(minutes=1)
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*")
# The curves `flwr supernode register` accepts (flwr.supercore.primitives.asymmetric.uses_nist_ec_curve).
_NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class CertificateLayout:
    """Where each file lives under the certificates directory, so that the writers, the
    checks and the printed commands cannot disagree about a path."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    def site_key(self, name: str) -> Path:
        return self._site_dir(name) / f"{name}.key"

    def site_public_key(self, name: str) -> Path:
        return self._site_dir(name) / f"{name}.pub"

    def site_names(self) -> list[str]:
        sites = self.root / "sites"
        return sorted(entry.name for entry in sites.iterdir() if entry.is_dir()) if sites.is_dir() else []

    def _site_dir(self, name: str) -> Path:
        validate_site_name(name)
        return self.root / "sites" / name


@dataclass(frozen=True)
class CheckedFile:
    """A file that passed every check, with what an operator wants to know about it."""

    path: Path
    detail: str


def validate_site_name(name: str) -> None:
    """A site name becomes a directory and file name, so it must not be able to escape
    DIR/sites (no '/', no '..') or need quoting in the printed commands."""
    if not _SITE_NAME.fullmatch(name):
        raise CohortInputError(
            f"site name {name!r} is not allowed; use 1-64 letters, "
            "digits, '-', '_' or '.', starting with a letter or digit"
        )


def subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The hosts given, in order and without repeats, and the loopback address and name.

    The SuperLink's own SuperExec dials it on 127.0.0.1, over the same TLS, and a
    certificate without that address leaves every run pending; the front door checks the
    SuperLink behind it as `localhost`. `cohort certs init` says that it adds both.
    """
    if not hosts:
        raise CohortInputError(
            "give at least one --superlink-host: a name or IP address SuperNodes use to reach the SuperLink"
        )
    names: list[x509.GeneralName] = []
    for host in (*hosts, LOOPBACK, LOOPBACK_NAME):
        name = _general_name(host)
        if name not in names:
            names.append(name)
    return names


def describe_names(names: Sequence[x509.GeneralName]) -> str:
    """SANs as an operator reads them, e.g. 'IP:10.0.0.5, DNS:superlink.example.org'."""
    return ", ".join(f"{'IP' if isinstance(name, x509.IPAddress) else 'DNS'}:{name.value}" for name in names)


def init_certificates(
    directory: Path,
    hosts: Sequence[str],
    *,
    passphrase: bytes,
    days: int = 365,
    force: bool = False,
    issued_at: datetime | None = None,
) -> list[Path]:
    """Write a new CA and a SuperLink certificate it signs; returns the paths written.

    The CA's private key is written encrypted with the passphrase (cryptography's best
    available PKCS#8 encryption), so a copied disk or backup does not hand out the
    power to issue SuperLink certificates every site trusts. Validity runs from a
    minute before issued_at (default: now), to allow for clock skew between machines,
    to `days` after it; tests pass an issued_at in the past or future to get
    certificates that are expired or not valid yet.
    """
    names = subject_alternative_names(hosts)
    if days < 1:
        raise CohortInputError(f"--days is {days}; a certificate must be valid for at least 1 day")
    if not passphrase:
        raise CohortInputError("the passphrase for ca.key is empty; give one (ca.key is never written unencrypted)")
    start = issued_at or datetime.now(UTC)
    not_before, not_after = start - _CLOCK_SKEW, start + timedelta(days=days)
    ca_key, server_key = _new_key(), _new_key()
    ca_cert = _ca_certificate(ca_key, not_before, not_after)
    server_cert = _server_certificate(server_key, names, ca_cert, ca_key, not_before, not_after)
    layout = CertificateLayout(directory)
    files = {
        layout.ca_cert: (ca_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE),
        layout.ca_key: (_pkcs8_pem(ca_key, serialization.BestAvailableEncryption(passphrase)), _PRIVATE_MODE),
        layout.server_cert: (server_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE),
        layout.server_key: (_pkcs8_pem(server_key, serialization.NoEncryption()), _PRIVATE_MODE),
    }
    _write_new_files(files, force)
    return list(files)


def create_site_key(directory: Path, name: str, *, force: bool = False) -> list[Path]:
    """Write a site's SuperNode authentication key pair; returns the paths written.

    The public key line carries the site's name as its comment, so the coordinator can
    tell registered keys apart even after a file has been renamed.
    """
    layout = CertificateLayout(directory)
    key = _new_key()
    public_line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files = {
        layout.site_key(name): (
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            _PRIVATE_MODE,
        ),
        layout.site_public_key(name): (public_line + f" cohort-site-{name}\n".encode(), _PUBLIC_MODE),
    }
    _write_new_files(files, force)
    return list(files)


def check_ca(path: Path) -> list[CheckedFile]:
    """Preflight for a machine that only trusts the CA: a SuperNode, or `flwr` on the
    coordinator. Only the coordinator can fix a bad CA, hence the advice."""
    ca = _load_ca(path, "copy the current ca.crt from the coordinator")
    return [CheckedFile(path, f"CA certificate, valid until {_moment(ca.not_valid_after_utc)}")]


def check_server_files(directory: Path, hosts: Sequence[str] = ()) -> list[CheckedFile]:
    """Preflight for flower-superlink: everything it would otherwise reject at startup, or
    a SuperNode would reject at its first handshake with an opaque TLS error."""
    layout = CertificateLayout(directory)
    reissue = (
        f"re-issue with `cohort certs init {directory} --superlink-host HOST --force` and give the sites the new ca.crt"
    )
    ca = _load_ca(layout.ca_cert, reissue)
    cert = _load_certificate(layout.server_cert, reissue)
    _require_current(layout.server_cert, cert, reissue)
    _require_issued_by(layout.server_cert, cert, layout.ca_cert, ca, reissue)
    key = _load_pem_private_key(layout.server_key, reissue)
    _require_same_key(layout.server_key, key.public_key(), layout.server_cert, cert.public_key(), reissue)
    names = _names(cert)
    for host in hosts:
        _require_host(layout.server_cert, names, host, directory)
    checked = [
        CheckedFile(layout.ca_cert, f"CA certificate, valid until {_moment(ca.not_valid_after_utc)}"),
        CheckedFile(
            layout.server_cert,
            f"signed by ca.crt, valid until {_moment(cert.not_valid_after_utc)}, SANs {describe_names(names)}",
        ),
        CheckedFile(layout.server_key, "matches superlink.crt, private to its owner"),
    ]
    if layout.ca_key.exists():
        _require_encrypted_ca_key(layout.ca_key, directory)
        checked.append(
            CheckedFile(
                layout.ca_key,
                "encrypted, private to its owner; only `cohort certs init` needs it, keep it off the SuperLink",
            )
        )
    return checked


def check_site_key(path: Path) -> list[CheckedFile]:
    """Preflight for flower-supernode --auth-supernode-private-key PATH, and for the public
    key beside it while the coordinator still has it (a stale .pub would be registered in vain)."""
    remake = f"make a new pair with `cohort certs site DIR {path.stem} --force`"
    _require_file(path, f"create it with `cohort certs site DIR {path.stem}`, or copy it from the coordinator")
    _require_private(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CohortInputError(
            f"{path} is not an unencrypted OpenSSH private key, which flower-supernode needs; {remake}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST_CURVES):
        raise CohortInputError(f"{path} is not an ECDSA key on a NIST curve, which Flower needs; {remake}")
    checked = [CheckedFile(path, f"SuperNode key, ECDSA {key.curve.name}, OpenSSH format, private to its owner")]
    public_path = path.with_suffix(".pub")
    if public_path.exists():
        _require_same_key(public_path, _load_ssh_public_key(public_path, remake), path, key.public_key(), remake)
        checked.append(CheckedFile(public_path, f"matches {path.name}; for `flwr supernode register`"))
    return checked


def check_registered_public_key(directory: Path, name: str) -> list[CheckedFile]:
    """Preflight on the coordinator for a site's public key, before `flwr supernode
    register`; the site's private key must not be here at all."""
    layout = CertificateLayout(directory)
    private, public = layout.site_key(name), layout.site_public_key(name)
    if private.exists():
        raise CohortInputError(
            f"{private} is a site's private key on the coordinator; it belongs to the site alone: give it to the "
            "site's operator (or have them make a new pair with `cohort certs site`), then delete it here"
        )
    key = _supernode_public_key(public, name)
    return [CheckedFile(public, f"the site's public key, ECDSA {key.curve.name}; for `flwr supernode register`")]


def supernode_public_key_line(path: Path, name: str) -> str:
    """The OpenSSH line of site `name`'s SuperNode public key at `path`, once it is one Flower takes."""
    return (
        _supernode_public_key(path, name)
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )


def _supernode_public_key(path: Path, name: str) -> ec.EllipticCurvePublicKey:
    fix = f"ask the site for the NAME.pub that `cohort certs site DIR {name}` wrote there"
    _require_file(path, fix)
    key = _load_ssh_public_key(path, fix)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise CohortInputError(f"{path} is not an ECDSA key on a NIST curve, which Flower needs; {fix}")
    return key


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.fullmatch(host):
        raise CohortInputError(
            f"--superlink-host {host!r} is neither an IP address nor a DNS name; "
            "give the host alone, without scheme, port or brackets (e.g. 10.0.0.5 or superlink.example.org)"
        )
    return x509.DNSName(host)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey, encryption: serialization.KeySerializationEncryption) -> bytes:
    """PKCS#8 PEM: the CA's key encrypted, the SuperLink's not (flower-superlink and nginx load it unattended)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, not_before: datetime, not_after: datetime) -> x509.Certificate:
    """Self-signed, and allowed to sign end-entity certificates only (path length 0)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_COMMON_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A TLS server certificate: SuperNodes and `flwr` check the host they dial against its SANs."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_new_files(files: Mapping[Path, tuple[bytes, int]], force: bool) -> None:
    """Refuse before writing anything, so that a refused command leaves every old file as it was."""
    existing = [str(path) for path in files if path.exists() or path.is_symlink()]
    if existing and not force:
        one = len(existing) == 1
        raise CohortInputError(
            f"{', '.join(existing)} already exist{'s' if one else ''}; nothing was written; pass --force to replace "
            f"{'it' if one else 'them'}"
        )
    for path in files:
        _make_directory(path.parent)
    for path, (data, mode) in files.items():
        write_bytes_atomic(path, data, mode)


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CohortInputError(
            f"{directory} cannot be created as a directory: a file is in the way; choose another DIR"
        ) from None


def _load_ca(path: Path, fix: str) -> x509.Certificate:
    ca = _load_certificate(path, fix)
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CohortInputError(f"{path} is not a CA certificate (no BasicConstraints ca=true); {fix}")
    _require_current(path, ca, fix)
    return ca


def _load_certificate(path: Path, fix: str) -> x509.Certificate:
    _require_file(path, fix)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise CohortInputError(f"{path} is not a PEM certificate; {fix}") from None


def _load_pem_private_key(path: Path, fix: str) -> PrivateKeyTypes:
    _require_file(path, fix)
    _require_private(path)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CohortInputError(
            f"{path} is not an unencrypted PEM private key, which flower-superlink needs; {fix}"
        ) from None


def _require_encrypted_ca_key(path: Path, directory: Path) -> None:
    """Opening the CA key needs its passphrase, which no SuperLink has: only check that it
    is a key that cannot be used without one."""
    _require_private(path)
    try:
        serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        return  # "Password was not given but private key is encrypted"
    except (ValueError, UnsupportedAlgorithm):
        raise CohortInputError(
            f"{path} is not a PEM private key; re-issue with "
            f"`cohort certs init {directory} --superlink-host HOST --force`"
        ) from None
    raise CohortInputError(
        f"{path} is not encrypted, so anyone who copies it can issue certificates every site trusts; "
        f"encrypt it (`openssl pkcs8 -topk8 -v2 aes-256-cbc -in {path} -out {path}.enc && mv {path}.enc {path}`) "
        f"or re-issue with `cohort certs init {directory} --superlink-host HOST --force`"
    )


def _load_ssh_public_key(path: Path, fix: str) -> PublicKeyTypes:
    try:
        return serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        raise CohortInputError(
            f"{path} is not an OpenSSH public key, which `flwr supernode register` needs; {fix}"
        ) from None


def _names(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _require_file(path: Path, create: str) -> None:
    if not path.is_file():
        raise CohortInputError(f"{path} does not exist; {create}")


def _require_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CohortInputError(
            f"{path} is accessible by group or others (mode {mode:04o}); "
            f"a private key must be mode 0600: run `chmod 600 {path}`"
        )


def _require_current(path: Path, cert: x509.Certificate, fix: str) -> None:
    now = datetime.now(UTC)
    valid = f"valid {_moment(cert.not_valid_before_utc)} to {_moment(cert.not_valid_after_utc)}"
    if now > cert.not_valid_after_utc:
        raise CohortInputError(f"{path} expired on {_moment(cert.not_valid_after_utc)} ({valid}); {fix}")
    if now < cert.not_valid_before_utc:
        raise CohortInputError(
            f"{path} is not valid until {_moment(cert.not_valid_before_utc)} "
            f"({valid}); check this machine's clock, or {fix}"
        )


def _require_issued_by(path: Path, cert: x509.Certificate, ca_path: Path, ca: x509.Certificate, fix: str) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CohortInputError(
            f"{path} was not signed by {ca_path}, so SuperNodes trusting that CA would refuse it; "
            f"use the ca.crt it was issued with, or {fix}"
        ) from None


def _require_same_key(path: Path, key: PublicKeyTypes, other_path: Path, other_key: PublicKeyTypes, fix: str) -> None:
    if _public_der(key) != _public_der(other_key):
        raise CohortInputError(f"{path} does not match {other_path}: they come from different key pairs; {fix}")


def _require_host(path: Path, names: list[x509.GeneralName], host: str, directory: Path) -> None:
    wanted = _general_name(host)
    if isinstance(wanted, x509.IPAddress):
        covered = wanted in names
    else:
        covered = any(isinstance(name, x509.DNSName) and name.value.lower() == wanted.value.lower() for name in names)
    if not covered:
        raise CohortInputError(
            f"{path} does not cover host {host} (its SANs: {describe_names(names)}); re-issue with "
            f"`cohort certs init {directory} --superlink-host {host} --force`, listing every host SuperNodes use"
        )


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _moment(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"
