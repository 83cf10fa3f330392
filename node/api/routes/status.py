"""GET /health and GET /status: public."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from node.api.deps import Node
from node.api.errors import ApiError
from node.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health", responses={503: {"description": "the engine or the adapter store is failing"}})
async def health(node: Node) -> JSONResponse:
    """Public: the engine's loop answers, the adapter store takes writes, the chain answers (node/health.py);
    503 when the node cannot serve, "degraded" (200) when only the chain is down."""
    healthy, doc = await node.health.check()
    return JSONResponse(doc, status_code=200 if healthy else 503)


@router.get("/status")
async def status(node: Node) -> dict:
    """Public: what a gateway's router and the explorer show."""
    return node.status_doc()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
async def metrics(node: Node) -> Response:
    """Public: Prometheus metrics, vLLM's names where vLLM has them (node/metrics.py)."""
    engine = node.engine
    try:  # taken on the engine thread between steps; shielded: giving up must not cancel the engine's future
        snapshot = await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(engine.call(engine.core.metrics_snapshot))), 10
        )
    except TimeoutError:
        raise ApiError(503, "the engine did not answer within 10 s", "engine_busy") from None
    return Response(node.metrics.render(snapshot), media_type=CONTENT_TYPE)
