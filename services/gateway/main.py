"""`rose gateway`: serve the OpenAI API at settings.host:settings.port."""

from __future__ import annotations

import logging

import uvicorn

from shared import telemetry
from shared.apikeys import ApiKeyError

from .app import create_app


def main(settings, args=None) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        try:
            telemetry.setup_tracing("gateway", settings)
            app = create_app(settings)
        except (ValueError, ApiKeyError) as exc:  # bad endpoints or key file: say so, no traceback
            logging.getLogger("rose.gateway").error("cannot start the gateway: %s", exc)
            return 2
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False)
    finally:
        telemetry.shutdown_tracing()
    return 0
