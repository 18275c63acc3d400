"""TLS on the listener: the real Filetracker client over HTTPS (its `requests` trusting a test
CA), credentials in its URL; a renewed certificate picked up by a reload."""

import datetime
import os
import signal
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from filetracker.client import Client

from conftest import BIN_DIR, Server
from test_auth import USERS, config
from test_client import unique, write


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def certificate(subject, issuer, key, signer, ca=False, serial=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
         .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
    return b.sign(signer, hashes.SHA256())


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("s3dedup test CA", "s3dedup test CA", ca_key, ca_key, ca=True)
    (d / "ca.pem").write_bytes(pem(ca))
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    issue = lambda serial: (d / "cert.pem").write_bytes(  # noqa: E731
        pem(certificate("s3dedup", "s3dedup test CA", key, ca_key, serial=serial)))
    issue(1001)
    return d, issue


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    d, _ = pki
    tls = (f'[api]\ntls_certificate_file = "{d}/cert.pem"\n'
           f'tls_key_file = "{d}/key.pem"\n')
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    srv = Server("local", tmp_path_factory.mktemp("tls"), config=tls + config(USERS),
                 tls_context=ctx)
    yield srv
    srv.stop()


def served_serial(server, ca):
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def test_the_real_client_over_https_with_credentials(server, pki, tmp_path, monkeypatch):
    d, _ = pki
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(d / "ca.pem"))
    url = server.url.replace("https://", "https://oioioi:admin-pw@")
    c = Client(remote_url=url, local_store=None)
    data = unique("tls", 300_000)
    name = c.put_file("/tls/f", write(tmp_path, data))
    stream, got = c.get_stream("/tls/f")
    assert stream.read() == data and got == name
    assert c.list_remote_files(None, "/tls", False) == ["f"]
    c.delete_file(name)


def test_plain_http_and_untrusted_clients_get_nothing(server, pki):
    d, _ = pki
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = s.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_renewed_certificate_is_used_after_a_reload(server, pki):
    d, issue = pki
    assert served_serial(server, d / "ca.pem") == 1001
    issue(1002)
    os.kill(server.api.pid, signal.SIGHUP)
    deadline = time.time() + 10
    while served_serial(server, d / "ca.pem") != 1002:
        assert time.time() < deadline, "the renewed certificate was never served"
        time.sleep(0.1)
    assert server.api.poll() is None


def test_a_missing_certificate_is_a_configuration_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[api]\ntls_certificate_file = "/nonexistent/cert.pem"\n'
                   'tls_key_file = "/nonexistent/key.pem"\n')
    out = subprocess.run([BIN_DIR / "s3dedup-api", "--config", cfg, "--data-dir",
                          tmp_path / "data", "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "/nonexistent/cert.pem" in out.stderr and "api.tls_certificate_file" in out.stderr, out
    check = subprocess.run([BIN_DIR / "s3dedup-api", "--config", cfg, "--check-config"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and "cannot read /nonexistent/cert.pem" in check.stderr, check
