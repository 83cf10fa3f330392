"""LoRAX's native REST API (API key required): /generate, /generate_stream, and / (the compat route lorax-client
posts to, answering either by the body's `stream`). Each is served by the completions path
(gateway.lorax_api); its errors are in LoRAX's shape (gateway/main.py's handlers)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from common.http import ANSWER_OR_EVENTS, EVENT_STREAM, error_responses
from gateway.deps import AuthDep, GatewayDep
from gateway.errors import ERROR_STATUSES
from gateway.lorax_api import ERROR_JSON
from gateway.request import ServedRequest

router = APIRouter()
# the errors these routes answer are LoRAX's {"error", "error_type"}, not the OpenAI shape the app declares
ERRORS = error_responses(ERROR_STATUSES, ERROR_JSON)
EVENTS = {200: {"description": "the answer's events, one a token", "content": EVENT_STREAM}}


@router.post("/generate", responses=ERRORS, operation_id="lorax_generate")
async def generate(request: Request, auth: AuthDep, gw: GatewayDep):
    """API key: LoRAX's generate (body: LoraxRequest), served as a completion."""
    return await ServedRequest(gw.deps, auth, api="lorax").respond(request)


@router.post("/generate_stream", responses=EVENTS | ERRORS, operation_id="lorax_generate_stream")
async def generate_stream(request: Request, auth: AuthDep, gw: GatewayDep):
    """API key: LoRAX's generate_stream (body: LoraxRequest), served as a streamed completion."""
    return await ServedRequest(gw.deps, auth, api="lorax_stream").respond(request)


@router.post("/", responses=ANSWER_OR_EVENTS | ERRORS, operation_id="lorax_compat_generate")
async def compat_generate(request: Request, auth: AuthDep, gw: GatewayDep):
    """API key: LoRAX's compat route (body: LoraxRequest; its `stream` picks the answer: a list of one answer, or
    the events), which lorax-client posts to."""
    return await ServedRequest(gw.deps, auth, api="lorax_compat").respond(request)
