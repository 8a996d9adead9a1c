"""KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and KAFKA_SSL_*: read once, checked against each
other at start, and turned into the keyword arguments of every Kafka client. Before them
the services, `ledgerctl` and the stack spoke PLAINTEXT only, and could not reach a cluster
that asks for TLS or SASL (Amazon MSK, Confluent Cloud, Aiven)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from faststream.kafka.security import parse_security

from deploy.local import free_port
from services.common.config import (
    KAFKA_SECURITY_VARS,
    SASL_MECHANISMS,
    ConfigError,
    KafkaAccess,
    KafkaSecurity,
    load_settings,
)
from services.common.kafka_clients import (
    BrokerUnreachable,
    broker_security,
    client_kwargs,
    security_kwargs,
    start_client,
)
from services.common.runtime import StartupError
from tests.tls import Pki, make_pki

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    made = make_pki(tmp_path_factory.mktemp("pki"))
    if made is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return made


@pytest.fixture(autouse=True)
def no_security_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KAFKA_SECURITY_VARS:
        monkeypatch.delenv(name, raising=False)


def refused(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as stop:
        load_settings()
    message = str(stop.value.code)
    assert "\n" not in message
    return message


def test_by_default_the_clients_speak_plaintext_with_the_arguments_they_had() -> None:
    settings = load_settings()
    assert settings.kafka_security == KafkaSecurity()
    assert client_kwargs(settings.kafka) == {"bootstrap_servers": settings.bootstrap_servers}
    assert broker_security(settings.kafka) is None


def test_sasl_credentials_reach_the_client_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b-1.msk:9096")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")  # any case, as Java takes it
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "scram-sha-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "loyalty")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    assert client_kwargs(load_settings().kafka) == {
        "bootstrap_servers": "b-1.msk:9096",
        "security_protocol": "SASL_PLAINTEXT",
        "ssl_context": None,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "loyalty",
        "sasl_plain_password": PASSWORD,
    }


def test_tls_verifies_the_broker_against_the_ca_given(
    monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "loyalty")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(pki.ca))
    kwargs = client_kwargs(load_settings().kafka)
    context = kwargs["ssl_context"]
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [dict(c["subject"][0])["commonName"] for c in context.get_ca_certs()] == ["test-ca"]


def test_without_a_ca_file_tls_trusts_the_systems_store() -> None:
    context = security_kwargs(KafkaSecurity(protocol="SSL"))["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == len(ssl.create_default_context().get_ca_certs())


def test_a_client_certificate_is_loaded_for_mutual_tls(
    monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(pki.ca))
    monkeypatch.setenv("KAFKA_SSL_CERTFILE", str(pki.client_cert))
    monkeypatch.setenv("KAFKA_SSL_KEYFILE", str(pki.client_key))
    security = load_settings().kafka_security
    assert security.protocol == "SSL"
    assert security_kwargs(security)["ssl_context"] is not None


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", SASL_MECHANISMS)
def test_the_faststream_broker_gets_what_the_aiokafka_clients_get(
    protocol: str, mechanism: str
) -> None:
    """The services' FastStream brokers take a `security=` object, which FastStream turns
    back into aiokafka's arguments for its producer and consumers: the very same."""
    sasl = protocol.startswith("SASL_")
    security = KafkaSecurity(
        protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username="loyalty" if sasl else "",
        sasl_password=PASSWORD if sasl else "",
    )
    access = KafkaAccess("b-1:9092", security)
    assert parse_security(broker_security(access)) == security_kwargs(security)


async def test_every_aiokafka_client_takes_the_arguments(pki: Pki) -> None:
    access = KafkaAccess(
        "127.0.0.1:1",
        KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "loyalty", PASSWORD, str(pki.ca)),
    )
    producer = AIOKafkaProducer(**client_kwargs(access))
    consumer = AIOKafkaConsumer(**client_kwargs(access))
    admin = AIOKafkaAdminClient(**client_kwargs(access))
    for client in (producer.client, consumer._client, admin._client):
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_mechanism == "SCRAM-SHA-256"
    await consumer.stop()


def test_the_password_is_never_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "loyalty")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    settings = load_settings()
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in repr(settings.kafka)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KAFKA_SECURITY_PROTOCOL": "TLS"},
            "KAFKA_SECURITY_PROTOCOL='TLS': must be one of PLAINTEXT, SSL, SASL_PLAINTEXT,"
            " SASL_SSL",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI",
             "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": PASSWORD},
            "KAFKA_SASL_MECHANISM='GSSAPI': must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            "KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u"},
            "KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT needs KAFKA_SASL_PASSWORD",
        ),
        # Credentials given without the protocol that sends them: the clients would connect
        # without them, and the broker would close the connection without a word.
        (
            {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": PASSWORD},
            "KAFKA_SASL_PASSWORD, KAFKA_SASL_USERNAME set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"
            " does not use them",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_MECHANISM": "PLAIN"},
            "KAFKA_SASL_MECHANISM set, but KAFKA_SECURITY_PROTOCOL=SSL does not use it",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u",
             "KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SSL_CAFILE": "/etc/ssl/ca.pem"},
            "KAFKA_SSL_CAFILE set, but KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT does not use it",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nowhere/ca.pem"},
            "KAFKA_SSL_CAFILE=/nowhere/ca.pem: no such file",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "/nowhere/client.pem"},
            "KAFKA_SSL_CERTFILE=/nowhere/client.pem: no such file",
        ),
    ],
)  # fmt: skip
def test_a_setting_that_cannot_work_stops_the_start_with_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    said = refused(monkeypatch, **env)
    assert said == message
    assert PASSWORD not in said


def test_a_ca_file_that_is_no_certificate_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    said = refused(
        monkeypatch, KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=f"{tmp_path}/ca.pem"
    )
    assert said.startswith(f"KAFKA_SSL_CAFILE={tmp_path}/ca.pem: not a PEM CA (")


def test_a_key_without_a_certificate_is_refused(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    said = refused(
        monkeypatch, KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_KEYFILE=str(pki.client_key)
    )
    assert said == "KAFKA_SSL_KEYFILE set without KAFKA_SSL_CERTFILE"


def test_a_key_of_another_certificate_is_refused(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    said = refused(
        monkeypatch,
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CERTFILE=str(pki.client_cert),
        KAFKA_SSL_KEYFILE=str(pki.server_key),
    )
    assert said.startswith(
        f"KAFKA_SSL_CERTFILE={pki.client_cert}, KAFKA_SSL_KEYFILE={pki.server_key}:"
        " not a PEM certificate and its key ("
    )


def test_an_encrypted_key_is_refused_rather_than_prompted_for(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, tmp_path: Path
) -> None:
    """OpenSSL asks for the password of an encrypted key on the terminal: a service started
    from one would wait there, and one without it fail with OpenSSL's words."""
    import subprocess

    locked = tmp_path / "locked.key"
    subprocess.run(
        ["openssl", "pkey", "-in", pki.client_key, "-out", locked, "-aes256",
         "-passout", "pass:pw"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    said = refused(
        monkeypatch,
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CERTFILE=str(pki.client_cert),
        KAFKA_SSL_KEYFILE=str(locked),
    )
    assert "the key is encrypted; give an unencrypted one" in said


class Unreachable:
    async def start(self) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1, 2)]")


async def test_a_client_that_cannot_reach_the_brokers_says_what_each_answered() -> None:
    """aiokafka's own error names no reason (a refused password, an untrusted certificate:
    those it logs); the services' start-up line and `ledgerctl` say it."""
    one, two = free_port(), free_port()  # nothing listens on them
    with pytest.raises(BrokerUnreachable) as failed:
        await start_client(Unreachable(), KafkaAccess(f"127.0.0.1:{one}"))
    assert str(failed.value).startswith(f"broker: 127.0.0.1:{one}: [Errno 111] Connect call")
    assert isinstance(failed.value, StartupError)  # one `startup_failed` line, no traceback
    assert isinstance(failed.value, KafkaConnectionError)  # what ledgerctl catches
    with pytest.raises(BrokerUnreachable) as failed:
        await start_client(Unreachable(), KafkaAccess(f"127.0.0.1:{one},127.0.0.1:{two}"))
    said = str(failed.value)
    assert said.startswith(f"broker: 127.0.0.1:{one},127.0.0.1:{two}: 127.0.0.1:{one}: [Errno")
    assert f"; 127.0.0.1:{two}: [Errno 111]" in said
