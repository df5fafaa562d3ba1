"""A real syslog collector for the ATNA tests: Debian ``rsyslogd`` on loopback.

:func:`rsyslog` writes a configuration for one transport — ``udp`` (imudp, RFC 5426),
``tcp`` (imtcp, RFC 6587 octet counting) or ``tls`` (imtcp with the GnuTLS network
stream driver, RFC 5425, asking for a client certificate of the test CA) — starts
``rsyslogd -n`` on a free port, and yields a :class:`Collector` whose :meth:`~Collector.
messages` are what rsyslog received: its own parse of the RFC 5424 header
(protocol version, APP-NAME, MSGID) beside the raw message.

The test CA, server and client certificates are made with ``cryptography``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import free_port, wait_until

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("pacslab test CA"))
        .issuer_name(name("pacslab test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]
    ) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), key

    pki = Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server-key.pem",
        directory / "client.pem",
        directory / "client-key.pem",
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server, server_key = leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    pki.server_cert.write_bytes(server)
    write_key(server_key, pki.server_key)
    client, client_key = leaf(
        "pacslab", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("pacslab.test")]
    )
    pki.client_cert.write_bytes(client)
    write_key(client_key, pki.client_key)
    return pki


@dataclass
class Collector:
    transport: str
    port: int
    output: Path
    pki: Pki | None
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"{self.transport}://127.0.0.1:{self.port}"

    def messages(self) -> list[dict[str, str]]:
        """What rsyslog received: ``version``, ``app``, ``msgid`` (its parse) and ``raw``."""
        try:
            text = self.output.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        # Whole lines only: rsyslog writes its file in buffered chunks, and a read
        # between two of them saw half a message (a flaky ParseError in CI).
        for line in text[: text.rfind("\n") + 1].splitlines():
            version, app, msgid, raw = line.split("\t", 3)
            out.append({"version": version, "app": app, "msgid": msgid, "raw": raw})
        return out


def _config(transport: str, port: int, work: Path, output: Path, pki: Pki | None) -> str:
    lines = [
        f'global(workDirectory="{work}" maxMessageSize="64k"'
        + (
            f' defaultNetstreamDriverCAFile="{pki.ca}"'
            f' defaultNetstreamDriverCertFile="{pki.server_cert}"'
            f' defaultNetstreamDriverKeyFile="{pki.server_key}"'
            if pki
            else ""
        )
        + ")",
    ]
    if transport == "udp":
        lines += ['module(load="imudp")', f'input(type="imudp" address="127.0.0.1" port="{port}")']
    elif transport == "tcp":
        lines += ['module(load="imtcp")', f'input(type="imtcp" address="127.0.0.1" port="{port}")']
    else:
        # RFC 5425 5.1/5.2: mutual authentication, the client's certificate must chain
        # to the test CA (x509/certvalid).
        lines += [
            'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" '
            'streamDriver.authMode="x509/certvalid")',
            f'input(type="imtcp" address="127.0.0.1" port="{port}")',
        ]
    lines += [
        'template(name="atna" type="list") {',
        '  property(name="protocol-version") constant(value="\\t")',
        '  property(name="app-name") constant(value="\\t")',
        '  property(name="msgid") constant(value="\\t")',
        '  property(name="rawmsg") constant(value="\\n")',
        "}",
        f'action(type="omfile" file="{output}" template="atna")',
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def rsyslog(transport: str, directory: Path, *, port: int | None = None) -> Iterator[Collector]:
    """``rsyslogd -n`` listening for ``transport`` on loopback (skips if not installed)."""
    if not Path(RSYSLOGD).exists():
        pytest.skip("Debian rsyslog is not installed; ./run test installs it")
    directory.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory / "pki") if transport == "tls" else None
    port = port or free_port()
    work, output = directory / "work", directory / "received.log"
    work.mkdir(exist_ok=True)
    conf = directory / "rsyslog.conf"
    conf.write_text(_config(transport, port, work, output, pki))
    check = subprocess.run(
        [RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    log = (directory / "rsyslogd.out").open("wb")
    process = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(directory / "rsyslogd.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: _listening(transport, port) or process.poll() is not None,
            timeout=20,
            message="rsyslogd did not start listening",
        )
        assert process.poll() is None, (directory / "rsyslogd.out").read_text()
        yield Collector(transport, port, output, pki, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _listening(transport: str, port: int) -> bool:
    """Is something bound to ``port`` on loopback (``ss``: no probe message is sent)?"""
    flag = "-uln" if transport == "udp" else "-tln"
    out = subprocess.run(
        ["ss", "-H", flag, f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    return f":{port}" in out
