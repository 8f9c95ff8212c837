"""GET /v1/models, /health, /ready, /metrics."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..auth import authorize
from ..errors import APIError
from ..schemas import ModelList

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorize)])
async def list_models(request: Request):
    pool = request.app.state.pool
    return {"object": "list", "data": [_card(m, pool) for m in pool.models]}


def _card(model: str, pool) -> dict:
    return {"id": model, "object": "model", "created": _STARTED, "owned_by": "rose", "max_model_len": pool.max_model_len}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
async def get_model(model_id: str, request: Request):
    pool = request.app.state.pool
    if model_id not in pool.models:
        raise APIError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
    return _card(model_id, pool)


async def _open_or_authorized(request: Request):
    """Health routes are open unless ROSE_OPEN_HEALTH is off."""
    if not request.app.state.settings.open_health:
        await authorize(request)


@router.get("/version", dependencies=[Depends(_open_or_authorized)])
async def version():
    try:
        return {"version": package_version("rose")}
    except PackageNotFoundError:  # run from a checkout that was never installed
        return {"version": "unknown"}


@router.get("/health", dependencies=[Depends(_open_or_authorized)])
async def health():
    """The process is up (liveness)."""
    return {"status": "ok"}


@router.get("/ready", dependencies=[Depends(_open_or_authorized)])
async def ready(request: Request):
    """A formatter reports a ready scheduler with a live worker (readiness)."""
    pool = request.app.state.pool
    if request.app.state.draining:
        raise APIError(503, "the gateway is shutting down", None, "draining", {"Retry-After": "1"})
    if not pool.ready:
        raise APIError(503, "no formatter reports a ready model yet", None, "not_ready", {"Retry-After": "1"})
    live = pool.live_links()
    return {"status": "ready", "models": pool.models, "formatters": len(live), "workers": max((l.workers for l in live), default=0)}


@router.get("/metrics", dependencies=[Depends(_open_or_authorized)])
async def metrics(request: Request):
    state = request.app.state
    state.metrics.formatters_live.set(len(state.pool.live_links()))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
