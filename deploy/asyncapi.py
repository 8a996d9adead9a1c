"""Writes the AsyncAPI document of each service to docs/asyncapi/ (`make docs`).

FastStream generates the documents from the services' real brokers and subscribers. Our
subscribers take raw batches (so bad input can be dead-lettered rather than raise), an
untyped body FastStream cannot see a payload type in; the payloads are filled in here from
the same pydantic models that validate the messages, and the output topics are declared
as publishers with their models. A unit test keeps the committed files current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
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
        broker.publisher(
            topic, title=f"{topic}:publish", description=DESCRIPTIONS[topic], schema=MODELS[topic]
        )
    spec: dict[str, Any] = (
        AsyncAPI(broker, title=f"loyalty {service}", version="1", description=description)
        .to_specification()
        .to_jsonable()
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for channel in spec.get("channels", {}).values():
        topic = channel.get("address")
        if topic not in MODELS:
            continue
        channel.setdefault("description", DESCRIPTIONS[topic])
        for ref in channel.get("messages", {}).values():
            name = ref["$ref"].rsplit("/", 1)[-1]
            message = spec["components"]["messages"][name]
            untyped = message.get("payload", {}).get("$ref", "").rsplit("/", 1)[-1]
            # The subscribers' handlers take the raw batch as an untyped body: FastStream
            # writes a schema with nothing but a title for it (or EmptyPayload).
            if untyped == "EmptyPayload" or set(schemas.get(untyped, {"": 0})) == {"title"}:
                schemas.pop(untyped, None)
                model_schema = TypeAdapter(MODELS[topic]).json_schema(
                    ref_template="#/components/schemas/{model}"
                )
                for def_name, definition in model_schema.pop("$defs", {}).items():
                    schemas.setdefault(def_name, definition)
                schema_name = topic.replace(".", "_")
                schemas[schema_name] = model_schema
                message["payload"] = {"$ref": f"#/components/schemas/{schema_name}"}
    schemas.pop("EmptyPayload", None)
    return json.dumps(spec, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


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
