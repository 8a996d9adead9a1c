"""The committed AsyncAPI documents match what the services declare (`make docs`), and real
messages of each topic hold to every channel that documents it.

Before 2026-11-29 the ledger's document described the grants it consumes with the ledger's
own PointsRevoked (data: MovementData), not the grant's (data: RevokeData): both models
claimed one name and the first written kept it, so a real revocation failed the schema."""

import json
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from rules_factories import T0
from test_fast_event_json import history
from test_fast_notifier_payload import EVENTS
from test_published_schemas import GOOD_ACTIVITIES, LETTER_BEFORE, sample_grants

import deploy.asyncapi
from deploy.asyncapi import DOCS_DIR, TOPICS, render_all
from schemas.ledger import DeadLetter
from services.ledger.journal import ledger_event_json
from services.rules.emit import grant_json


def test_committed_asyncapi_documents_are_current() -> None:
    for filename, text in render_all().items():
        path = DOCS_DIR / filename
        assert path.exists(), f"{filename} missing: run `make docs`"
        assert path.read_text(encoding="utf-8") == text, f"{filename} is stale: run `make docs`"


def test_every_consumed_topic_documents_its_payload() -> None:
    for filename, text in render_all().items():
        spec = json.loads(text)
        for name, message in spec["components"]["messages"].items():
            assert "EmptyPayload" not in json.dumps(message), f"{filename}: {name} has no payload"


def _samples() -> dict[str, list[Any]]:
    """Messages of every type each topic carries, as the services write them."""
    letter = DeadLetter(
        dlq_id="d", consumer="rules", source_topic=TOPICS.activity, source_partition=0,
        source_offset=7, reason="malformed JSON", original="{oops",
        original_encoding="utf-8", received_at=T0, original_size=5,
    )  # fmt: skip
    samples = {
        TOPICS.activity: GOOD_ACTIVITIES,
        TOPICS.grants: [orjson.loads(grant_json(g)) for g in sample_grants()],
        TOPICS.ledger: [orjson.loads(ledger_event_json(e)) for e in history()]
        + [orjson.loads(e.model_dump_json()) for e in EVENTS],
        TOPICS.dlq: [orjson.loads(letter.model_dump_json()), LETTER_BEFORE],
    }
    assert {g["type"] for g in samples[TOPICS.grants]} >= {"points_revoked", "tier_evaluated"}
    assert {e["type"] for e in samples[TOPICS.ledger]} >= {"points_revoked", "tier_changed"}
    return samples


@pytest.mark.parametrize("filename", ["rules.json", "ledger.json", "notifier.json"])
def test_real_messages_hold_to_every_channel_of_their_topic(filename: str) -> None:
    spec = json.loads(render_all()[filename])
    registry = Registry().with_resource(
        "urn:doc", Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    samples = _samples()
    checked = set()
    for name, channel in spec["channels"].items():
        for ref in channel["messages"].values():
            message = spec["components"]["messages"][ref["$ref"].rsplit("/", 1)[-1]]
            assert message["bindings"]["kafka"]["key"]["type"] == "string"
            schema = {"$ref": "urn:doc" + message["payload"]["$ref"]}
            validator = Draft202012Validator(schema, registry=registry)
            for sample in samples[channel["address"]]:
                errors = [e.message[:200] for e in validator.iter_errors(sample)]
                assert not errors, f"{filename} {name}: {sample.get('type')}: {errors}"
            checked.add(channel["address"])
    assert TOPICS.dlq in checked
    assert len(checked) >= 2


class loyalty_grants_v1(BaseModel):  # a model named as a topic's payload
    points: int


def test_generation_fails_rather_than_give_two_schemas_one_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(deploy.asyncapi.MODELS, TOPICS.activity, loyalty_grants_v1)
    with pytest.raises(ValueError, match="loyalty_grants_v1"):
        render_all()
