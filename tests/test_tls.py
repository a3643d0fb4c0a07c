"""TLS is a configuration switch: a server with a certificate, clients trusting its CA."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from audiomesh.config import load_settings
from audiomesh.rpc.server import start_server
from audiomesh.services.composite.server import build


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_grpc_over_tls(tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    settings = load_settings(
        store_url=f"file://{tmp_path / 'store'}", tls_cert_file=cert_file, tls_key_file=key_file, tls_ca_file=cert_file
    )
    spec = build(settings)
    server = await start_server(
        spec.registrations, service="composite", bind="localhost:0", tls=(cert_file.read_bytes(), key_file.read_bytes())
    )
    clients = settings.client_factory()
    try:
        assert await clients.health(f"localhost:{server.port}") == "SERVING"
        async with grpc.aio.insecure_channel(f"localhost:{server.port}") as plain:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
    finally:
        await clients.close()
        await server.stop(1)
