"""The gateway's own routes, all public: node heartbeats, the gateway's key, health and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway import dns
from gateway.deps import GatewayDep
from gateway.errors import GatewayError

router = APIRouter()


@router.get("/health")
async def health(request: Request, gw: GatewayDep) -> JSONResponse:
    """Public: liveness, live nodes, outbox and settlement state."""
    # 503 while the outbox cannot be written: this gateway serves nothing then, and says why
    body = gw.health()
    settler = request.app.state.settler
    if settler is not None:  # a low deposit is a warning here, not a reason to refuse requests
        body["settlement"] = await settler.status()
    return JSONResponse(body, status_code=200 if body["outbox"]["writable"] else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
async def metrics(request: Request, gw: GatewayDep) -> Response:
    """Public: Prometheus metrics."""
    gw.metrics.live_nodes.set(len(gw.directory.live()))
    for node_id in list(gw.directory.disputed):
        gw.metrics.disputed_nodes.labels(node_id).set(1)
    settler = request.app.state.settler
    if settler is not None:
        gw.metrics.set_settlement(await settler.status())
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)


@router.get("/internal/gateway-key")
async def gateway_key(gw: GatewayDep) -> dict:
    """Public: the key this gateway signs its calls to nodes with (a node operator's allow-list takes it)."""
    return {"gateway_key": gw.gateway_key_hex}


@router.post("/internal/heartbeat")
async def heartbeat(request: Request, gw: GatewayDep) -> dict:
    """Public: a node's signed heartbeat (the signature and the chain's registry are the authentication).
    The answer names this gateway's key, so a node learns whose signed calls to accept."""
    raw = await request.body()
    try:
        entry = await asyncio.to_thread(gw.directory.take_heartbeat, raw, gw.settings.max_heartbeat_bytes)
    except GatewayError:
        gw.metrics.heartbeats.labels("refused").inc()
        raise
    gw.metrics.heartbeats.labels("accepted").inc()
    dns.NODES.warm(entry.api_url)  # its name's addresses ready before a request needs them (gateway.dns)
    return {"accepted": True, "node_id": entry.node_id, "ttl_s": gw.directory.ttl, "gateway_key": gw.gateway_key_hex}
