"""DICOM over TLS: a CA, a server and a client certificate made here, a real TLS client."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp, TlsSettings
from pacs_sentinel.dicom_io.spool import Spool
from tests.conftest import free_port


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
           *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sentinel test CA")])
    ca_cert = _issue("Sentinel test CA", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    return {
        "ca": _write_cert(ca_cert, folder / "ca.pem"),
        "server_cert": _write_cert(_issue("SENTINEL", server_key, ca_name, ca_key, server=True), folder / "server.pem"),
        "server_key": _write_key(server_key, folder / "server.key"),
        "client_cert": _write_cert(_issue("MODALITY", client_key, ca_name, ca_key), folder / "client.pem"),
        "client_key": _write_key(client_key, folder / "client.key"),
    }


def _start(tmp_path: Path, pki: dict[str, Path], *, require_client_cert: bool) -> StorageScp:
    tls = TlsSettings(pki["server_cert"], pki["server_key"], pki["ca"], require_client_cert=require_client_cert)
    scp = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port(), tls=tls),
                     Spool(tmp_path, Database(tmp_path / "index.db")))
    scp.start()
    return scp


def _client_context(pki: dict[str, Path], *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if with_cert:
        context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return context


def _associate(port: int, tls_args: tuple[ssl.SSLContext, str] | None):
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="SENTINEL", tls_args=tls_args)


def test_tls_client_is_served_and_plain_client_is_not(tmp_path: Path, pki: dict[str, Path]) -> None:
    scp = _start(tmp_path, pki, require_client_cert=False)
    try:
        assoc = _associate(scp.port, (_client_context(pki, with_cert=True), "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        rows = list(scp.spool.database.connection()["instances"].rows)
        assert [r["sop_instance_uid"] for r in rows] == [ds.SOPInstanceUID]

        plain = _associate(scp.port, None)
        assert not plain.is_established
        # A client without a certificate is fine while client certificates are optional.
        anonymous = _associate(scp.port, (_client_context(pki, with_cert=False), "localhost"))
        assert anonymous.is_established
        anonymous.release()
    finally:
        scp.stop()


def test_required_client_certificate_refuses_a_client_without_one(tmp_path: Path, pki: dict[str, Path]) -> None:
    scp = _start(tmp_path, pki, require_client_cert=True)
    try:
        anonymous = _associate(scp.port, (_client_context(pki, with_cert=False), "localhost"))
        assert not anonymous.is_established
        if anonymous.is_alive():
            anonymous.abort()
        assoc = _associate(scp.port, (_client_context(pki, with_cert=True), "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        scp.stop()


def test_listener_processes_keep_tls_and_access_control(tmp_path: Path, pki: dict[str, Path]) -> None:
    """Two listener processes sharing one socket: TLS only, allowed peers only, counts back to zero."""
    import time

    from pacs_sentinel.dicom_io.scp import Receiver

    tls = TlsSettings(pki["server_cert"], pki["server_key"], pki["ca"])
    settings = ScpSettings("SENTINEL", "127.0.0.1", 0, tls=tls, allowed_peers=(("MODALITY", None),))
    receiver = Receiver(settings, tmp_path, tmp_path / "index.db", processes=2)

    def wait_until_idle() -> None:  # the server side of a refused caller winds down after the client saw it
        deadline = time.monotonic() + 10
        while receiver.associations_per_listener() != [0, 0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.associations_per_listener() == [0, 0]

    receiver.start()
    try:
        tls_args = (_client_context(pki, with_cert=True), "localhost")
        assert not _associate(receiver.port, None).is_established  # plain TCP
        stranger = AE(ae_title="STRANGER")
        stranger.acse_timeout = stranger.network_timeout = 5
        stranger.add_requested_context(Verification)
        refused = stranger.associate("127.0.0.1", receiver.port, ae_title="SENTINEL", tls_args=tls_args)
        assert refused.is_rejected
        wait_until_idle()
        served = [_associate(receiver.port, tls_args) for _ in range(2)]
        assert all(assoc.is_established for assoc in served)
        assert receiver.associations_per_listener() == [1, 1]
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        assert served[0].send_c_store(ds).Status == 0x0000
        for assoc in served:
            assoc.release()
        wait_until_idle()
    finally:
        receiver.stop()
    rows = list(Database(tmp_path / "index.db").connection()["instances"].rows)
    assert [r["sop_instance_uid"] for r in rows] == [ds.SOPInstanceUID]
