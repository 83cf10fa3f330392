"""GET /health and GET /status: public."""

from __future__ import annotations

from fastapi import APIRouter

from node.api.deps import Node

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    """Public."""
    return {"status": "ok"}


@router.get("/status")
async def status(node: Node) -> dict:
    """Public: what a gateway's router and the explorer show."""
    return node.status_doc()
