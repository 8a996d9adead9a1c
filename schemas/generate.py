"""Writes schemas/json/*.schema.json from the pydantic models (`make schemas`).

The files are committed so non-Python producers can validate against them; a unit test
fails when they drift from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from schemas.activity import Activity
from schemas.grants import GrantEvent
from schemas.ledger import DeadLetter, LedgerEvent

JSON_DIR = Path(__file__).resolve().parent / "json"

DOCUMENTS: dict[str, Any] = {
    "activity.v1": Activity,
    "grants.v1": GrantEvent,
    "ledger.v1": LedgerEvent,
    "dlq.v1": DeadLetter,
}


# Inbound events are described as we read them (what a producer may send), our own as
# we write them (what a consumer will get).
INBOUND = {"activity.v1"}


def render_all() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, model in DOCUMENTS.items():
        mode: JsonSchemaMode = "validation" if name in INBOUND else "serialization"
        schema = TypeAdapter(model).json_schema(mode=mode)
        schema["$id"] = f"urn:loyalty:schema:{name}"
        schema["title"] = f"loyalty.{name}"
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    return out


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for filename, text in render_all().items():
        (JSON_DIR / filename).write_text(text, encoding="utf-8")
        print(f"wrote schemas/json/{filename}")


if __name__ == "__main__":
    main()
