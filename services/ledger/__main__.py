"""`python -m services.ledger`: the grants consumer, the relay and the HTTP API in one process."""

import os

import uvicorn

from services.common.config import load_settings
from services.common.logging import configure_logging
from services.common.runtime import startup_failures
from services.ledger.api import create_app
from services.ledger.service import SERVICE

if __name__ == "__main__":
    configure_logging(SERVICE)
    with startup_failures():  # a refused setting; uvicorn reports a failed lifespan itself
        settings = load_settings()
        app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=os.environ.get("LEDGER_HOST", "127.0.0.1"),
            port=settings.ledger_port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_config=None,
        )
    )
    # A SIGTERM only sets uvicorn's flag, which its start-up never reads: the service's
    # wait for Postgres reads it (`uvicorn.run` gave no way to hand it over).
    app.state.ledger.stopping = lambda: server.should_exit
    server.run()
    if not server.started:
        raise SystemExit(3)  # as `uvicorn.run` does: the start-up failed
