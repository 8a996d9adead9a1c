"""The services, `ledgerctl` and `make up`'s topic creation on a broker that asks for SASL
and TLS: the local Apache Kafka's SASL_PLAINTEXT and SASL_SSL listeners (tests/infra.py,
`local_kafka`). Every Kafka client spoke PLAINTEXT before KAFKA_SECURITY_PROTOCOL and its
settings, and none of them got past its first request to such a listener."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from deploy import local
from deploy.local import free_port
from services.common.config import Topics
from services.common.migrations import apply_migrations
from services.ledger.rebuild import verify
from tests.infra import SASL_PASSWORD, SASL_USER, LocalKafka
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, make_stack, wait_until
from tests.integration.rules_helpers import LEDGERCTL, ROOT

pytestmark = pytest.mark.integration

NOW = datetime.now(CST).replace(microsecond=0)
WRONG_PASSWORD = "not-the-password"


def sasl(mechanism: str, password: str = SASL_PASSWORD, **more: str) -> dict[str, str]:
    return {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": mechanism,
        "KAFKA_SASL_USERNAME": SASL_USER,
        "KAFKA_SASL_PASSWORD": password,
        **more,
    }


def publish(stack: Stack, path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`ledgerctl events publish` of `path` with the stack's settings and `env`."""
    return subprocess.run(
        [LEDGERCTL, "events", "publish", str(path)],
        cwd=ROOT,
        env={**stack.env("ctl"), "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_stack_pays_a_purchase_sent_by_ledgerctl_over_sasl(
    local_kafka: LocalKafka, fresh_database: str, tmp_path: Path
) -> None:
    """SASL_PLAINTEXT, PLAIN: the services' consumers and relays, the ledger's readiness
    check, `ledgerctl`'s admin client and producer, and the harness's own clients."""
    stack = await make_stack(local_kafka.sasl_plaintext, fresh_database, "kafka", sasl("PLAIN"))
    try:
        await stack.wait_ready()
        event = purchase("m-sasl", "300.00", NOW - timedelta(minutes=5))
        path = tmp_path / "events.jsonl"
        path.write_text(json.dumps(event) + "\n")
        ran = await asyncio.to_thread(publish, stack, path)
        assert ran.returncode == 0, ran.stdout + ran.stderr

        async def paid() -> bool:
            resp = await stack.get("/v1/members/m-sasl")
            return resp.status_code == 200 and resp.json()["qualifying_spend"] == "300.00"

        await wait_until(paid, what="the purchase paid, through the API")
        assert (await stack.read_topic(stack.topics.grants, expect=1))[0].key == b"m-sasl"
        assert not (await verify(fresh_database)).differences
    finally:
        stack.stop_all()
    for service in ("rules", "ledger", "notifier"):
        assert all(SASL_PASSWORD not in line for line in stack.log_lines(service))


async def unstarted_stack(bootstrap: str, dsn: str, env: dict[str, str]) -> Stack:
    """A stack of no process yet, its topics created with the settings in `env`."""
    name = uuid.uuid4().hex[:10]
    stack = Stack(bootstrap, dsn, Topics(prefix=f"t{name}."), free_port(), {}, name, env)
    await local.create_topics_async(stack.kafka, stack.topics.all())
    return stack


async def test_a_wrong_password_stops_a_service_and_ledgerctl_saying_so(
    local_kafka: LocalKafka, fresh_database: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(apply_migrations, fresh_database)
    stack = await unstarted_stack(local_kafka.sasl_plaintext, fresh_database, sasl("PLAIN"))
    stack.extra_env["KAFKA_SASL_PASSWORD"] = WRONG_PASSWORD
    refused = (
        "[Error 58] SaslAuthenticationFailed: Authentication failed: Invalid username or password"
    )
    stack.start("rules")
    try:
        exited = await asyncio.to_thread(stack.procs["rules"].wait, 60)
    finally:
        stack.stop_all()
    assert exited == 1
    failed = [json.loads(x) for x in stack.log_lines("rules") if "startup_failed" in x]
    assert failed[-1]["error"] == f"broker: {local_kafka.sasl_plaintext}: {refused}"
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(purchase("m-x", "1.00", NOW)) + "\n")
    ran = await asyncio.to_thread(publish, stack, path)
    assert ran.returncode == 2
    assert f"error: broker: {local_kafka.sasl_plaintext}: {refused}" in ran.stderr
    for said in (ran.stdout + ran.stderr, *stack.log_lines("rules")):
        assert WRONG_PASSWORD not in said


async def test_over_tls_with_scram_ledgerctl_sends_and_a_broker_not_trusted_is_refused(
    local_kafka: LocalKafka, tmp_path: Path
) -> None:
    """SASL_SSL, SCRAM-SHA-512, the broker's certificate signed by the CA given: the topic
    creation of `make up`, `ledgerctl`'s clients and a consumer of the harness."""
    if local_kafka.sasl_ssl is None or local_kafka.pki is None:
        pytest.skip("no openssl command, so no CA and no TLS listener")
    pki = local_kafka.pki
    env = sasl("SCRAM-SHA-512", KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SSL_CAFILE=str(pki.ca))
    stack = await unstarted_stack(local_kafka.sasl_ssl, "", env)
    event = purchase("m-tls", "80.00", NOW)
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(event) + "\n")
    ran = await asyncio.to_thread(publish, stack, path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    [record] = await stack.read_topic(stack.topics.activity, expect=1)
    assert json.loads(record.value) == event

    untrusted = await asyncio.to_thread(publish, stack, path, KAFKA_SSL_CAFILE=str(pki.other_ca))
    assert untrusted.returncode == 2
    assert (
        f"error: broker: {local_kafka.sasl_ssl}: [SSL: CERTIFICATE_VERIFY_FAILED] certificate"
        " verify failed: unable to get local issuer certificate"
    ) in untrusted.stderr
