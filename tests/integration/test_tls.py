"""DICOM TLS (PS3.15 Annex B.9): mutual TLS with real clients, refusals, and no stalls.

A throw-away CA, server and client certificate are made with ``cryptography`` for each test
session; dcmtk ``storescu +tls`` and pynetdicom (``tls_args``) are the clients.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.config import Config
from service import scp
from service.audit import AuditLog
from service.spool import Spool
from tests.support.node import free_port, make_ct

STORESCU = "/usr/bin/storescu"
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    pem = serialization.Encoding.PEM
    ca_key, rogue_ca_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _cert("l3spot test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    out = {}
    for name, issuer, issuer_key in (
        ("server", ca, ca_key),
        ("client", ca, ca_key),
        ("rogue", rogue_ca, rogue_ca_key),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, issuer.subject, issuer_key, ca=False)
        (d / f"{name}.pem").write_bytes(cert.public_bytes(pem))
        out[name] = (d / f"{name}.pem", _key_pem(key, d / f"{name}.key"))
    return Pki(
        d / "ca.pem",
        *out["server"],
        *out["client"],
        *out["rogue"],  # type: ignore[arg-type]
    )


@dataclass
class TlsNode:
    port: int
    spool: Spool
    audit: AuditLog
    ae: AE


@pytest.fixture()
def node(tmp_path: Path, pki: Pki) -> Iterator[TlsNode]:
    config = Config.model_validate(
        {
            "node": {"port": free_port(), "host": "127.0.0.1", "spool_dir": str(tmp_path / "s")},
            "security": {
                "tls_enabled": True,
                "tls_certificate": str(pki.server_cert),
                "tls_private_key": str(pki.server_key),
                "tls_ca_certificate": str(pki.ca),
            },
        }
    )
    spool = Spool(tmp_path / "s", tmp_path / "q")
    audit = AuditLog(tmp_path / "audit.log")
    ae, _ = scp.start_scp(config, spool, lambda *a: None, audit=audit)
    yield TlsNode(config.node.port, spool, audit, ae)
    ae.shutdown()


def _client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _associate(port: int, ctx: ssl.SSLContext | None) -> Association:
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    tls = (ctx, "localhost") if ctx is not None else None
    return ae.associate("127.0.0.1", port, ae_title="L3SPOT", tls_args=tls)


def test_pynetdicom_with_a_client_certificate_from_the_ca_stores_over_tls(
    node: TlsNode, pki: Pki
) -> None:
    assoc = _associate(node.port, _client_context(pki, pki.client_cert, pki.client_key))
    assert assoc.is_established
    ds = make_ct(generate_uid(), generate_uid())
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1
    time.sleep(0.2)
    assert [r["tls"] for r in node.audit.read() if r["outcome"] == "released"] == [True]


@pytest.mark.parametrize("who", ["no client certificate", "certificate from another CA"])
def test_clients_without_a_trusted_certificate_are_refused(
    node: TlsNode, pki: Pki, who: str
) -> None:
    cert, key = (None, None) if who.startswith("no") else (pki.rogue_cert, pki.rogue_key)
    assoc = _associate(node.port, _client_context(pki, cert, key))
    assert not assoc.is_established
    ok = _associate(node.port, _client_context(pki, pki.client_cert, pki.client_key))
    assert ok.is_established and int(ok.send_c_echo().Status) == 0
    ok.release()


def test_plain_tcp_client_is_refused_on_the_tls_port(node: TlsNode, pki: Pki) -> None:
    assoc = _associate(node.port, None)
    assert not assoc.is_established
    assert not list(node.spool.root.rglob("*.dcm"))


def test_a_silent_connection_does_not_block_other_tls_clients(node: TlsNode, pki: Pki) -> None:
    with socket.create_connection(("127.0.0.1", node.port)):  # connects, never says hello
        t0 = time.monotonic()
        assoc = _associate(node.port, _client_context(pki, pki.client_cert, pki.client_key))
        assert assoc.is_established
        assert time.monotonic() - t0 < 5
        assoc.release()


@pytest.mark.integration
def test_dcmtk_storescu_with_tls_and_client_certificate(
    node: TlsNode, pki: Pki, tmp_path: Path
) -> None:
    if not os.access(STORESCU, os.X_OK):
        pytest.skip("dcmtk storescu not installed (see .ci/run)")
    study, series = generate_uid(), generate_uid()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        make_ct(study, series, i).save_as(src / f"{i}.dcm", enforce_file_format=True)
    base = ["-aet", "CT1", "-aec", "L3SPOT", "127.0.0.1", str(node.port), "+sd", str(src)]
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    out = subprocess.run(
        [STORESCU, *tls, *base], capture_output=True, text=True, timeout=60, env=NODELAY
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(list((node.spool.root / study / series).glob("*.dcm"))) == 3
    rogue = ["+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)]
    bad = subprocess.run(
        [STORESCU, *rogue, *base], capture_output=True, text=True, timeout=60, env=NODELAY
    )
    assert bad.returncode != 0
    plain = subprocess.run(
        [STORESCU, *base], capture_output=True, text=True, timeout=60, env=NODELAY
    )
    assert plain.returncode != 0
    assert len(list(node.spool.root.rglob("*.dcm"))) == 3
