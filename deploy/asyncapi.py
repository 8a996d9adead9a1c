"""Writes the AsyncAPI document of each service to docs/asyncapi/ (`make docs`).

FastStream generates the documents from the services' real brokers and subscribers. Our
subscribers take raw batches (so bad input can be dead-lettered rather than raise), an
untyped body FastStream cannot see a payload type in. The payloads of every channel, the
output topics' publishers included, are filled in here from the same pydantic models that
validate the messages, generated together so that no two models share a name. Unit tests
keep the committed files current and check real messages against every channel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from faststream.specification.asyncapi.utils import move_pydantic_refs
from pydantic import TypeAdapter

from schemas.activity import Activity
from schemas.grants import GrantEvent
from schemas.ledger import DeadLetter, LedgerEvent
from services.common.config import Settings

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs" / "asyncapi"
SETTINGS = Settings(
    database_url="postgresql://localhost/loyalty", bootstrap_servers="localhost:9092"
)
TOPICS = SETTINGS.topics
MODELS: dict[str, Any] = {
    TOPICS.activity: Activity,
    TOPICS.grants: GrantEvent,
    TOPICS.ledger: LedgerEvent,
    TOPICS.dlq: DeadLetter,
}
DESCRIPTIONS = {
    TOPICS.activity: "Activity from POS, booking and app systems, keyed by member_id.",
    TOPICS.grants: "Point grants, revocations and tier evaluations, keyed by member_id.",
    TOPICS.ledger: "Every point movement and tier change of the ledger, keyed by member_id.",
    TOPICS.dlq: "Messages a consumer could not use, with the reason and source coordinates.",
}
_MEMBER_KEY = {"type": "string", "description": "member_id: a member's events stay in order."}
KEYS = {
    TOPICS.activity: _MEMBER_KEY,
    TOPICS.grants: _MEMBER_KEY,
    TOPICS.ledger: _MEMBER_KEY,
    TOPICS.dlq: {
        "type": "string",
        "description": "The key of the message dead-lettered (its member_id), if it had one.",
    },
}


def _brokers() -> dict[str, tuple[KafkaBroker, list[str], str]]:
    from services.ledger.service import LedgerService
    from services.notifier.app import create_app as notifier_app
    from services.rules.app import create_app as rules_app

    return {
        "rules": (
            rules_app(SETTINGS).broker,  # type: ignore[dict-item]
            [TOPICS.grants, TOPICS.dlq],
            "Turns activity into point grants under the rule-set version in force.",
        ),
        "ledger": (
            LedgerService(SETTINGS).broker,
            [TOPICS.ledger, TOPICS.dlq],
            "Journals grants, projects balances, tiers and lots; publishes ledger events.",
        ),
        "notifier": (
            notifier_app(SETTINGS).broker,  # type: ignore[dict-item]
            [TOPICS.dlq],
            "Tells members about points earned, tier changes and expiring points.",
        ),
    }


def render(service: str, broker: KafkaBroker, outputs: list[str], description: str) -> str:
    for topic in outputs:
        broker.publisher(topic, title=f"{topic}:publish", description=DESCRIPTIONS[topic])
    spec: dict[str, Any] = (
        AsyncAPI(broker, title=f"loyalty {service}", version="1", description=description)
        .to_specification()
        .to_jsonable()
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    channels = [c for c in spec.get("channels", {}).values() if c.get("address") in MODELS]
    payloads = _payload_schemas({channel["address"] for channel in channels})
    for channel in channels:
        topic = channel["address"]
        channel.setdefault("description", DESCRIPTIONS[topic])
        for ref in channel.get("messages", {}).values():
            message = spec["components"]["messages"][ref["$ref"].rsplit("/", 1)[-1]]
            # FastStream names a schema for each untyped body (the subscribers take raw
            # batches, the publishers are declared without a model): ours replace them.
            schemas.pop(message.get("payload", {}).get("$ref", "").rsplit("/", 1)[-1], None)
            message["payload"] = {"$ref": f"#/components/schemas/{_schema_name(topic)}"}
            message["bindings"] = {"kafka": {"key": KEYS[topic], "bindingVersion": "0.4.0"}}
    for name, definition in payloads.items():
        if schemas.setdefault(name, definition) != definition:
            raise ValueError(f"{service}: two different schemas named {name}")
    return json.dumps(spec, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def _schema_name(topic: str) -> str:
    return topic.replace(".", "_")


def _payload_schemas(topics: set[str]) -> dict[str, Any]:
    """The topics' payloads and the models they use, generated together: pydantic then
    names two models of one name apart by their module (a grant's and a ledger event's
    PointsRevoked), where schemas generated one by one would both claim the name."""
    keyed, shared = TypeAdapter.json_schemas(
        [(topic, "validation", TypeAdapter(MODELS[topic])) for topic in sorted(topics)]
    )
    payloads = {_schema_name(topic): schema for (topic, _), schema in keyed.items()}
    for name, definition in shared.get("$defs", {}).items():
        if payloads.setdefault(name, definition) != definition:
            raise ValueError(f"a model is named as the payload of a topic: {name}")
    # Refs into components/schemas and discriminators as AsyncAPI spells them, as
    # FastStream writes its own payloads.
    return {name: move_pydantic_refs(schema, "$defs") for name, schema in payloads.items()}


def render_all() -> dict[str, str]:
    return {
        f"{service}.json": render(service, broker, outputs, description)
        for service, (broker, outputs, description) in _brokers().items()
    }


def main() -> None:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    for filename, text in render_all().items():
        (DOCS_DIR / filename).write_text(text, encoding="utf-8")
        print(f"wrote docs/asyncapi/{filename}")


if __name__ == "__main__":
    main()
