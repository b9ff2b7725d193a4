"""The processor honours the broker TLS settings ingest and the sink take (librdkafka's ``ssl.*`` keys in
``KAFKA__EXTRA``): a custom CA and a client certificate (mutual TLS) reach its client's TLS context."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import certifi
import pytest

from processors.app import _credentials
from schemas.settings import KafkaSettings, ProcessorSettings


def settings(**kafka: object) -> ProcessorSettings:
    return ProcessorSettings(kafka=KafkaSettings.model_validate(kafka))


def test_a_custom_ca_is_used() -> None:
    creds = _credentials(settings(security_protocol="SSL", extra={"ssl.ca.location": certifi.where()}))
    context: ssl.SSLContext = creds.context
    assert context.cert_store_stats()["x509_ca"] > 100  # the bundle given, not only the system's


def test_a_wrong_ca_path_fails_at_start_not_later() -> None:
    with pytest.raises(FileNotFoundError):
        _credentials(settings(security_protocol="SSL", extra={"ssl.ca.location": "/nonexistent/ca.pem"}))


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_a_client_certificate_is_loaded_for_sasl_ssl_too(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "client")
    other_cert, _ = _certificate(tmp_path, "other")

    def creds(certificate: Path) -> object:
        extra = {
            "ssl.ca.location": str(cert),
            "ssl.certificate.location": str(certificate),
            "ssl.key.location": str(key),
        }
        return _credentials(
            settings(
                security_protocol="SASL_SSL", sasl_username="u", sasl_password="p", sasl_mechanism="PLAIN", extra=extra
            )
        )

    good = creds(cert)
    assert good.ssl_context.cert_store_stats()["x509_ca"] == 1  # type: ignore[attr-defined]  # the CA given
    with pytest.raises(ssl.SSLError):  # the key is checked against the certificate: it was loaded
        creds(other_cert)
