"""`cohort certs`: the CA, the SuperLink's TLS certificate and the sites' SuperNode keys of a
real Flower deployment, the commands printed for them, and the preflight check.

The CLI is driven through `certs_app` itself: importing `cli.main` pulls in torch and
Flower's simulation engine, which would make this file take many times longer.
"""

from __future__ import annotations

import ipaddress
import shutil
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.constant import SUPERLINK_UVICORN_DEFAULT_PORT
from typer.testing import CliRunner

from cli.certs import certs_app
from deploy.certificates import CertificateLayout, create_site_key, init_certificates
from deploy.commands import SUPERLINK_LOCAL_PORT, SUPERLINK_PORT

runner = CliRunner()
HOSTS = ("10.0.0.5", "superlink.example.org", "127.0.0.1")
SERVER_FILES = ("ca.crt", "ca.key", "superlink.crt", "superlink.key")
PASSPHRASE = b"correct horse battery staple"


def _certs(*args: str | Path) -> Result:
    return runner.invoke(certs_app, [str(arg) for arg in args])


def _init(directory: Path, *extra: str) -> Result:
    """`cohort certs init` with the passphrase in a file beside the directory."""
    hosts = [word for host in HOSTS for word in ("--superlink-host", host)]
    passphrase_file = directory.parent / f".{directory.name}-passphrase"
    passphrase_file.write_bytes(PASSPHRASE + b"\n")
    return _certs("init", directory, *hosts, "--ca-passphrase-file", passphrase_file, *extra)


def _error(result: Result) -> str:
    """The one line a user error prints, after checking it is exactly that: exit 2, one line."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """The coordinator's directory as `cohort certs init` leaves it, plus the public key
    that hospital-a's `cohort certs site` made at the site and sent."""
    directory = tmp_path / "certs"
    assert _init(directory).exit_code == 0
    assert _certs("site", tmp_path / "site", "hospital-a").exit_code == 0
    (directory / "sites" / "hospital-a").mkdir(parents=True)
    shutil.copy(
        tmp_path / "site" / "sites" / "hospital-a" / "hospital-a.pub",
        directory / "sites" / "hospital-a" / "hospital-a.pub",
    )
    return directory


def _handshake(directory: Path, server_hostname: str) -> None:
    """A TLS handshake, in memory, between Python's ssl (what flower-superlink serves with)
    loaded with superlink.crt/.key and a client that trusts only ca.crt, with the strict
    X.509 checks newer Pythons turn on by default."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(directory / "superlink.crt", directory / "superlink.key")
    client_context = ssl.create_default_context(cafile=directory / "ca.crt")
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname=server_hostname)
    server = server_context.wrap_bio(to_server, to_client, server_side=True)
    pending = [client, server]
    for _ in range(10):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        if not pending:
            return
    raise AssertionError("the TLS handshake did not finish")


# cohort certs init


def test_init_writes_the_ca_and_superlink_files_with_private_keys_0600(tmp_path: Path) -> None:
    assert _init(tmp_path).exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(SERVER_FILES)
    assert _mode(tmp_path / "ca.key") == 0o600
    assert _mode(tmp_path / "superlink.key") == 0o600


def test_init_puts_ip_hosts_in_ip_sans_and_names_in_dns_sans_plus_the_loopback_address_and_name(tmp_path: Path) -> None:
    _init(tmp_path)
    names = (
        _certificate(tmp_path / "superlink.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert len(list(names)) == 4


def test_init_makes_a_self_signed_ca_allowed_to_sign_certificates(tmp_path: Path) -> None:
    _init(tmp_path)
    ca = _certificate(tmp_path / "ca.crt")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert constraints.critical and constraints.value.ca
    assert usage.critical and usage.value.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"
    ca.verify_directly_issued_by(ca)


def test_init_issues_a_server_auth_certificate_signed_by_the_ca(tmp_path: Path) -> None:
    _init(tmp_path)
    server = _certificate(tmp_path / "superlink.crt")
    server.verify_directly_issued_by(_certificate(tmp_path / "ca.crt"))
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_makes_certificates_valid_from_a_minute_ago_for_the_given_days(tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    _init(tmp_path, "--days", "30")
    after = datetime.now(UTC)
    for name in ("ca.crt", "superlink.crt"):
        certificate = _certificate(tmp_path / name)
        assert before - timedelta(minutes=1) <= certificate.not_valid_before_utc <= after - timedelta(minutes=1)
        assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == timedelta(days=30, minutes=1)


@pytest.mark.parametrize("host", ["superlink.example.org", "127.0.0.1", "10.0.0.5"])
def test_a_tls_client_trusting_ca_crt_accepts_superlink_crt_for_every_given_host(tmp_path: Path, host: str) -> None:
    _init(tmp_path)
    _handshake(tmp_path, host)


def test_a_tls_client_refuses_superlink_crt_for_a_host_not_given(tmp_path: Path) -> None:
    _init(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(tmp_path, "superlink.other.org")


def test_init_prints_the_sans_and_the_superlink_command(tmp_path: Path) -> None:
    result = _init(tmp_path)
    assert "SANs written: IP:10.0.0.5, DNS:superlink.example.org, IP:127.0.0.1, DNS:localhost" in " ".join(
        result.stdout.split()
    )
    assert f"cohort superlink \\\n    --certs {tmp_path}" in result.stdout
    assert (
        f"cohort connect '<CONNECTION>' \\\n    --superlink 127.0.0.1:{SUPERLINK_LOCAL_PORT} \\\n"
        f"    --ca-cert {tmp_path / 'ca.crt'}" in result.stdout
    )
    assert "cohort site register '<SITE_NAME>' '<CONNECTION>' \\\n    --key '<SITE_NAME>.pub'" in result.stdout


@pytest.mark.parametrize("host", ["10.0.0.5:8000", "https://superlink.example.org", "[::1]", "two words"])
def test_init_rejects_a_host_that_is_not_a_bare_name_or_address_and_writes_nothing(tmp_path: Path, host: str) -> None:
    line = _error(_certs("init", tmp_path / "certs", "--superlink-host", host))
    assert f"--superlink-host {host!r} is neither an IP address nor a DNS name" in line
    assert not (tmp_path / "certs").exists()


def test_init_refuses_to_overwrite_an_existing_file_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("the operator's own CA")
    line = _error(_init(tmp_path))
    assert f"{tmp_path / 'ca.crt'} already exists" in line and "pass --force" in line
    assert _files(tmp_path) == {"ca.crt": b"the operator's own CA"}


def test_init_with_force_replaces_every_file_and_keeps_keys_private(tmp_path: Path) -> None:
    _init(tmp_path)
    old = _files(tmp_path)
    (tmp_path / "superlink.key").chmod(0o644)
    assert _init(tmp_path, "--force").exit_code == 0
    new = _files(tmp_path)
    assert new.keys() == old.keys() and all(new[name] != old[name] for name in SERVER_FILES)
    assert _mode(tmp_path / "superlink.key") == 0o600


# cohort certs site


def test_site_writes_a_0600_p384_key_in_the_openssh_format_flower_supernode_loads(tmp_path: Path) -> None:
    """flower-supernode loads --auth-supernode-private-key with load_ssh_private_key and
    requires an EC key (flwr/supernode/cli/flower_supernode.py); importing that module
    here would double this file's run time."""
    assert _certs("site", tmp_path, "hospital-a").exit_code == 0
    key_file = tmp_path / "sites" / "hospital-a" / "hospital-a.key"
    assert _mode(key_file) == 0o600
    private_key = serialization.load_ssh_private_key(key_file.read_bytes(), password=None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(private_key.curve, ec.SECP384R1)


def test_site_writes_a_one_line_openssh_public_key_matching_the_private_key(tmp_path: Path) -> None:
    _certs("site", tmp_path, "hospital-a")
    site = tmp_path / "sites" / "hospital-a"
    line = (site / "hospital-a.pub").read_text()
    private_key = serialization.load_ssh_private_key((site / "hospital-a.key").read_bytes(), password=None)
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.count("\n") == 1 and line.endswith("\n")
    assert serialization.load_ssh_public_key(line.encode()) == private_key.public_key()


def test_flwr_supernode_register_accepts_the_site_public_key(tmp_path: Path) -> None:
    _certs("site", tmp_path, "hospital-a")
    assert try_load_public_key(tmp_path / "sites" / "hospital-a" / "hospital-a.pub").startswith(
        b"-----BEGIN PUBLIC KEY-----"
    )


def test_site_prints_the_register_and_supernode_commands(tmp_path: Path) -> None:
    result = _certs("site", tmp_path, "hospital-a")
    site = tmp_path / "sites" / "hospital-a"
    assert f"Send {site / 'hospital-a.pub'} to the coordinator" in " ".join(result.stdout.split())
    assert "cohort site register hospital-a '<CONNECTION>' \\\n    --key hospital-a.pub" in result.stdout
    assert f"--ca-cert {tmp_path / 'ca.crt'}" in result.stdout
    assert f"--auth-key {site / 'hospital-a.key'}" in result.stdout
    assert f"--superlink '<SUPERLINK_HOST>:{SUPERLINK_PORT}'" in result.stdout
    assert "--name hospital-a" in result.stdout


def test_the_printed_port_is_flowers_superlink_port() -> None:
    assert SUPERLINK_PORT == SUPERLINK_UVICORN_DEFAULT_PORT


def test_site_refuses_to_overwrite_an_existing_key_pair_and_writes_nothing(tmp_path: Path) -> None:
    _certs("site", tmp_path, "hospital-a")
    before = _files(tmp_path)
    line = _error(_certs("site", tmp_path, "hospital-a"))
    assert str(tmp_path / "sites" / "hospital-a" / "hospital-a.key") in line and "pass --force" in line
    assert _files(tmp_path) == before


def test_site_with_force_replaces_the_key_pair(tmp_path: Path) -> None:
    _certs("site", tmp_path, "hospital-a")
    before = _files(tmp_path)
    assert _certs("site", tmp_path, "hospital-a", "--force").exit_code == 0
    after = _files(tmp_path)
    assert after.keys() == before.keys() and all(after[name] != before[name] for name in after)


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "", ".", "..", "_underscore-first", "two words", "x" * 65, "ünïcode"]
)
def test_site_rejects_an_invalid_name_and_writes_nothing(tmp_path: Path, name: str) -> None:
    line = _error(_certs("site", tmp_path / "certs", name))
    assert f"site name {name!r} is not allowed" in line
    assert not (tmp_path / "certs").exists()


# cohort certs check


def test_check_passes_on_fresh_files_and_lists_them(certs: Path) -> None:
    result = _certs("check", certs, *[word for host in HOSTS for word in ("--superlink-host", host)])
    assert result.exit_code == 0, result.output
    for name in (*SERVER_FILES, "hospital-a.pub"):
        assert name in result.stdout


@pytest.mark.parametrize("name", ["superlink.key", "ca.key"])
def test_check_names_a_private_key_readable_by_others(certs: Path, name: str) -> None:
    (certs / name).chmod(0o640)
    line = _error(_certs("check", certs))
    assert f"{certs / name} is accessible by group or others (mode 0640)" in line
    assert f"chmod 600 {certs / name}" in line


def test_check_names_an_expired_certificate_with_its_dates(tmp_path: Path) -> None:
    issued = datetime(2020, 1, 1, tzinfo=UTC)
    init_certificates(tmp_path, ["localhost"], passphrase=PASSPHRASE, days=1, issued_at=issued)
    line = _error(_certs("check", tmp_path))
    assert (
        f"{tmp_path / 'ca.crt'} expired on 2020-01-02 00:00 UTC (valid 2019-12-31 23:59 UTC to 2020-01-02 00:00 UTC)"
        in line
    )
    assert "--force" in line


def test_check_names_a_certificate_not_valid_yet(tmp_path: Path) -> None:
    init_certificates(tmp_path, ["localhost"], passphrase=PASSPHRASE, issued_at=datetime.now(UTC) + timedelta(days=2))
    line = _error(_certs("check", tmp_path))
    assert f"{tmp_path / 'ca.crt'} is not valid until" in line and "clock" in line


def test_check_names_a_server_certificate_from_another_ca(certs: Path, tmp_path: Path) -> None:
    init_certificates(tmp_path / "other", HOSTS, passphrase=PASSPHRASE)
    shutil.copy(tmp_path / "other" / "ca.crt", certs / "ca.crt")
    shutil.copy(tmp_path / "other" / "ca.key", certs / "ca.key")
    line = _error(_certs("check", certs))
    assert f"{certs / 'superlink.crt'} was not signed by {certs / 'ca.crt'}" in line


def test_check_names_a_server_key_that_does_not_match_its_certificate(certs: Path, tmp_path: Path) -> None:
    init_certificates(tmp_path / "other", HOSTS, passphrase=PASSPHRASE)
    shutil.copy(tmp_path / "other" / "superlink.key", certs / "superlink.key")
    line = _error(_certs("check", certs))
    assert f"{certs / 'superlink.key'} does not match {certs / 'superlink.crt'}" in line


def test_check_names_a_host_not_in_the_sans_and_lists_the_sans(certs: Path) -> None:
    line = _error(_certs("check", certs, "--superlink-host", "10.0.0.5", "--superlink-host", "superlink.other.org"))
    assert f"{certs / 'superlink.crt'} does not cover host superlink.other.org" in line
    assert "(its SANs: IP:10.0.0.5, DNS:superlink.example.org, IP:127.0.0.1, DNS:localhost)" in line


def test_check_matches_dns_hosts_regardless_of_case(certs: Path) -> None:
    assert _certs("check", certs, "--superlink-host", "SuperLink.Example.org").exit_code == 0


@pytest.mark.parametrize("name", ["ca.crt", "superlink.crt", "superlink.key", "sites/hospital-a/hospital-a.pub"])
def test_check_names_a_missing_file(certs: Path, name: str) -> None:
    (certs / name).unlink()
    line = _error(_certs("check", certs))
    assert f"{certs / name} does not exist" in line


@pytest.mark.parametrize(
    "name,kind",
    [
        ("ca.crt", "is not a PEM certificate"),
        ("superlink.crt", "is not a PEM certificate"),
        ("superlink.key", "is not an unencrypted PEM private key"),
        ("sites/hospital-a/hospital-a.pub", "is not an OpenSSH public key"),
    ],
)
def test_check_names_a_garbage_file(certs: Path, name: str, kind: str) -> None:
    (certs / name).write_bytes(b"not a key or certificate\n")
    line = _error(_certs("check", certs))
    assert f"{certs / name} {kind}" in line


def test_check_refuses_a_sites_private_key_on_the_coordinator(certs: Path, tmp_path: Path) -> None:
    shutil.copy2(
        tmp_path / "site" / "sites" / "hospital-a" / "hospital-a.key", certs / "sites" / "hospital-a" / "hospital-a.key"
    )
    line = _error(_certs("check", certs))
    assert f"{certs / 'sites' / 'hospital-a' / 'hospital-a.key'} is a site's private key on the coordinator" in line


def test_check_with_site_names_a_public_key_of_another_pair(certs: Path, tmp_path: Path) -> None:
    create_site_key(tmp_path / "other", "hospital-a")
    site = tmp_path / "site" / "sites" / "hospital-a"
    shutil.copy(tmp_path / "other" / "sites" / "hospital-a" / "hospital-a.pub", site / "hospital-a.pub")
    shutil.copy(certs / "ca.crt", tmp_path / "site" / "ca.crt")
    line = _error(_certs("check", tmp_path / "site", "--site", "hospital-a"))
    assert f"{site / 'hospital-a.pub'} does not match" in line


def test_check_with_site_needs_only_ca_crt_and_that_sites_key(certs: Path, tmp_path: Path) -> None:
    site_machine = CertificateLayout(tmp_path / "site-machine")
    site_machine.site_key("hospital-a").parent.mkdir(parents=True)
    shutil.copy(certs / "ca.crt", site_machine.ca_cert)
    shutil.copy2(tmp_path / "site" / "sites" / "hospital-a" / "hospital-a.key", site_machine.site_key("hospital-a"))
    result = _certs("check", site_machine.root, "--site", "hospital-a")
    assert result.exit_code == 0, result.output
    assert "hospital-a.key" in result.stdout


# the CA's passphrase


def test_init_encrypts_the_ca_key_with_the_passphrase(tmp_path: Path) -> None:
    _init(tmp_path)
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=None)
    key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=PASSPHRASE)
    assert key.public_key() == _certificate(tmp_path / "ca.crt").public_key()


def test_init_without_a_passphrase_outside_a_terminal_says_how_to_give_one_and_writes_nothing(tmp_path: Path) -> None:
    line = _error(_certs("init", tmp_path / "certs", "--superlink-host", "superlink.example.org"))
    assert "no passphrase for ca.key" in line and "--ca-passphrase-file" in line
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_init_with_an_empty_passphrase_file_writes_nothing(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "passphrase").write_bytes(content)
    line = _error(
        _certs(
            "init", tmp_path / "certs", "--superlink-host", "h.example", "--ca-passphrase-file", tmp_path / "passphrase"
        )
    )
    assert "is empty" in line
    assert not (tmp_path / "certs").exists()


def test_init_with_a_missing_passphrase_file_names_it(tmp_path: Path) -> None:
    line = _error(
        _certs("init", tmp_path / "certs", "--superlink-host", "h.example", "--ca-passphrase-file", tmp_path / "nope")
    )
    assert f"--ca-passphrase-file {tmp_path / 'nope'} cannot be read" in line
