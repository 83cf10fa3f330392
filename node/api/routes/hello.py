"""POST /internal/gateway-hello: public; the hello's settler signature and the chain are its authentication."""

from __future__ import annotations

from fastapi import APIRouter, Request

from node.api.deps import Node
from node.api.errors import ApiError
from node.gateway_hello import HELLO_PATH, HelloError, parse_hello

router = APIRouter()


@router.post(
    HELLO_PATH,
    responses={
        403: {"description": "the signer is not a settler, or this node trusts only its operator's gateways"},
        404: {"description": "this node is not on chain: it learns gateways only from its operator"},
        503: {"description": "the chain cannot say now whether the signer is a settler"},
    },
)
async def gateway_hello(request: Request, node: Node) -> dict:
    """A gateway found this node in the chain's registry and introduces itself (node/gateway_hello.py); the
    answer is the node's signed heartbeat."""
    if node.on_hello is None:
        raise ApiError(404, "this node is not on chain: it learns its gateways from its operator", "hello_not_taken")
    try:
        doc = parse_hello(await request.body())
    except HelloError as e:
        raise ApiError(400, str(e), "invalid_hello") from None
    return await node.on_hello(doc)
