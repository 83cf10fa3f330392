"""GET /health and GET /status: public."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from node.api.deps import Node

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
