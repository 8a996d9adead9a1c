"""`python -m services.ledger`: the grants consumer, the relay and the HTTP API in one process."""

import os

import uvicorn

from services.common.config import load_settings
from services.common.logging import configure_logging
from services.ledger.api import create_app
from services.ledger.service import SERVICE

if __name__ == "__main__":
    configure_logging(SERVICE)
    settings = load_settings()
    uvicorn.run(
        create_app(settings),
        host=os.environ.get("LEDGER_HOST", "127.0.0.1"),
        port=settings.ledger_port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
    )
