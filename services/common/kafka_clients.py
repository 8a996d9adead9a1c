"""How every Kafka client the project makes reaches the brokers, TLS and SASL included.

Every producer, consumer and admin client is made with `client_kwargs`, and the services'
FastStream brokers with `broker_security`, which stands for the same keyword arguments:
a client made without them speaks PLAINTEXT, and against a cluster that asks for TLS or
SASL (Amazon MSK, Confluent Cloud, Aiven) it never gets past the first connection.
"""

from __future__ import annotations

import functools
import ssl
from typing import TYPE_CHECKING, Any, Final

from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context

from services.common.config import KafkaAccess, KafkaSecurity, refuse_key_password
from services.common.runtime import StartupError

if TYPE_CHECKING:
    from faststream.security import BaseSecurity

# How long the look at why the brokers are out of reach waits for each one's answer.
PROBE_TIMEOUT_MS: Final = 5000


def client_kwargs(kafka: KafkaAccess) -> dict[str, Any]:
    """The keyword arguments an aiokafka client (AIOKafkaProducer, AIOKafkaConsumer,
    AIOKafkaAdminClient) needs to reach `kafka`; the caller adds its own tuning."""
    return {"bootstrap_servers": kafka.bootstrap_servers, **security_kwargs(kafka.security)}


def security_kwargs(security: KafkaSecurity) -> dict[str, Any]:
    """aiokafka's names for `security` (none for PLAINTEXT, aiokafka's default)."""
    if security.protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {
        "security_protocol": security.protocol,
        "ssl_context": ssl_context(security) if security.tls else None,
    }
    if security.sasl:
        kwargs["sasl_mechanism"] = security.sasl_mechanism
        kwargs["sasl_plain_username"] = security.sasl_username
        kwargs["sasl_plain_password"] = security.sasl_password
    return kwargs


@functools.cache
def ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """One context per process, shared by its clients: each new one (a log-end reader
    reconnecting every few seconds) would read the CA bundle again. It verifies the
    brokers' certificates and host names; the files were checked at start
    (`config.load_kafka_security`)."""
    context: ssl.SSLContext = create_ssl_context(
        cafile=security.ssl_cafile or None,
        certfile=security.ssl_certfile or None,
        keyfile=security.ssl_keyfile or None,
        password=refuse_key_password,
    )
    return context


def broker_security(kafka: KafkaAccess) -> BaseSecurity | None:
    """`security_kwargs` as FastStream's KafkaBroker takes them: its `security=` object,
    which it turns back into those keyword arguments for its producer and every
    subscriber's consumer (faststream.kafka.security.parse_security)."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    security = kafka.security
    context = ssl_context(security) if security.tls else None
    if not security.sasl:
        return None if context is None else BaseSecurity(ssl_context=context)
    sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
    return sasl[security.sasl_mechanism](
        security.sasl_username, security.sasl_password, ssl_context=context
    )


class BrokerUnreachable(StartupError, KafkaConnectionError):  # type: ignore[misc]
    """A client could not reach the brokers, with the reason the broker or TLS gave.

    aiokafka raises only "Unable to bootstrap from [...]" and logs each address's own
    error, such as a password refused or a certificate not trusted, where a service's log
    must be searched for it and `ledgerctl` (its aiokafka logs quiet) never showed it.
    A `StartupError` (the services' `startup_failed` line says it all) and a
    `KafkaConnectionError` (what the callers of `client.start()` already handle).
    """

    __str__ = StartupError.__str__  # the message alone, not KafkaError's "<class>: <message>"


async def start_client(client: Any, kafka: KafkaAccess) -> None:
    """`client.start()` (a producer, consumer or admin client of `kafka`); a broker out of
    reach is a `BrokerUnreachable` saying why."""
    try:
        await client.start()
    except KafkaConnectionError as exc:
        why = await unreachable_because(kafka) or str(exc)
        raise BrokerUnreachable(f"broker: {kafka.bootstrap_servers}: {why}") from exc


async def unreachable_because(kafka: KafkaAccess) -> str:
    """What the bootstrap addresses answer a client of `kafka` that connects and asks for
    metadata, as a client does first (each named, if more than one); empty if one answers."""
    from aiokafka.conn import collect_hosts, create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    reasons = []
    hosts = collect_hosts(kafka.bootstrap_servers, randomize=False)
    for host, port, _ in hosts:
        try:
            conn = await create_conn(
                host, port, request_timeout_ms=PROBE_TIMEOUT_MS, **security_kwargs(kafka.security)
            )
            try:
                await conn.send(MetadataRequest([]))
            finally:
                conn.close()
        except Exception as exc:  # its text is the answer sought
            reasons.append(f"{host}:{port}: {exc}" if len(hosts) > 1 else str(exc))
        else:
            return ""
    return "; ".join(reasons)
