"""`rose gateway`: serve the OpenAI API at settings.host:settings.port."""

from __future__ import annotations

import logging

import uvicorn

from shared import telemetry

from .app import create_app


def main(settings, args=None) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    telemetry.setup_tracing("gateway", settings)
    try:
        app = create_app(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False)
    finally:
        telemetry.shutdown_tracing()
    return 0
