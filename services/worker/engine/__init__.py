"""The batching engine: paged KV blocks, sampling, the continuous-batching loop and its async face."""

from services.worker.engine.async_engine import AsyncEngine, EngineShutDown
from services.worker.engine.engine import Engine, EngineStats
from services.worker.engine.errors import EngineInputError
from services.worker.engine.sequence import RequestOutput

__all__ = ["AsyncEngine", "Engine", "EngineInputError", "EngineShutDown", "EngineStats", "RequestOutput"]
