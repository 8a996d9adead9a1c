"""`python -m services.rules`: run the rules service until SIGTERM."""

import asyncio

import uvloop

from services.common.logging import configure_logging
from services.common.runtime import startup_failures
from services.rules.app import SERVICE, create_app

if __name__ == "__main__":
    configure_logging(SERVICE)
    uvloop.install()
    with startup_failures():
        asyncio.run(create_app().run())
