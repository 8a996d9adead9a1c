"""The committed AsyncAPI documents match what the services declare (`make docs`)."""

import json

from deploy.asyncapi import DOCS_DIR, render_all


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
