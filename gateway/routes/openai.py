"""The OpenAI-compatible routes: models, completions, chat completions, responses (and their input token count);
and vLLM's /tokenize and /detokenize (API key required)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.http import ANSWER_OR_EVENTS
from gateway.deps import AuthDep, GatewayDep, ListingDep
from gateway.errors import ResponseNotStored
from gateway.openai_api import DetokenizeRequest, TokenizeRequest, parse_request
from gateway.prompts import detokenize, input_tokens, tokenize
from gateway.request import ServedRequest
from gateway.responses_api import InputTokensRequest

router = APIRouter()


@router.get("/v1/models")
async def models(auth: ListingDep, gw: GatewayDep) -> dict:
    """API key (not counted against its requests per minute): the models this key may use."""
    return {"object": "list", "data": gw.catalog.list_models(auth.key, auth.private)}


@router.get("/v1/models/{model:path}")
async def model(model: str, auth: ListingDep, gw: GatewayDep) -> dict:
    """API key (not counted against its requests per minute): one model this key may use."""
    return gw.catalog.model_object(model, auth.key, auth.private)


@router.post("/v1/completions", responses=ANSWER_OR_EVENTS)
async def completions(request: Request, auth: AuthDep, gw: GatewayDep):
    """API key: an OpenAI completion (body: CompletionRequest)."""
    return await ServedRequest(gw.deps, auth, api="completions").respond(request)


@router.post("/v1/chat/completions", responses=ANSWER_OR_EVENTS)
async def chat_completions(request: Request, auth: AuthDep, gw: GatewayDep):
    """API key: an OpenAI chat completion (body: ChatRequest)."""
    return await ServedRequest(gw.deps, auth, api="chat").respond(request)


@router.post("/v1/responses", responses=ANSWER_OR_EVENTS)
async def responses(request: Request, auth: AuthDep, gw: GatewayDep):
    """API key: an OpenAI response (body: ResponsesRequest; served as the chat it is, nothing stored)."""
    return await ServedRequest(gw.deps, auth, api="responses").respond(request)


@router.post("/v1/responses/input_tokens", operation_id="count_input_tokens")
async def count_input_tokens(request: Request, auth: AuthDep, gw: GatewayDep) -> dict:
    """API key: the input tokens a Responses request is billed (body: InputTokensRequest; free, counted against the
    key's requests per minute as /tokenize is). Before the stored responses' routes, which would take its path."""
    req = await parse_request(InputTokensRequest, await request.body(), gw.settings.max_body_bytes)
    target = gw.catalog.resolve_request(req.model, req.adapter_weights, auth.key, auth.private)
    return await input_tokens(gw.templates, target, req.as_chat())


# a route a method, each with its own operation id (a route serving several methods gives them one)
@router.get("/v1/responses/{response_id}", operation_id="retrieve_response")
@router.delete("/v1/responses/{response_id}", operation_id="delete_response")
@router.post("/v1/responses/{response_id}", operation_id="update_response")
@router.get("/v1/responses/{response_id}/{action:path}", operation_id="read_response_part")
@router.post("/v1/responses/{response_id}/{action:path}", operation_id="act_on_response")
async def stored_response(request: Request, response_id: str, auth: AuthDep) -> None:
    """API key: a stored response, its input items, its cancellation: none here, said in one line (404). GET or DELETE
    on the input token count's own path is a 405 (it was the 404 of a response named "input_tokens"; review)."""
    if response_id == "input_tokens" and request.method in ("GET", "DELETE") and not request.path_params.get("action"):
        raise StarletteHTTPException(405, "the input token count takes POST", headers={"Allow": "POST"})
    raise ResponseNotStored(
        "this gateway stores no responses (store is not supported): keep the response you were sent, and send the "
        "whole conversation in input"
    )


@router.post("/tokenize")
async def tokenize_prompt(request: Request, auth: AuthDep, gw: GatewayDep) -> dict:
    """API key: a prompt's or a chat's token ids, as the gateway counts them (body: TokenizeRequest; free)."""
    req = await parse_request(TokenizeRequest, await request.body(), gw.settings.max_body_bytes)
    target = gw.catalog.resolve_request(req.model, None, auth.key, auth.private)
    return await tokenize(gw.templates, target, req)


@router.post("/detokenize")
async def detokenize_ids(request: Request, auth: AuthDep, gw: GatewayDep) -> dict:
    """API key: token ids as text (body: DetokenizeRequest; free)."""
    req = await parse_request(DetokenizeRequest, await request.body(), gw.settings.max_body_bytes)
    target = gw.catalog.resolve_request(req.model, None, auth.key, auth.private)
    return await detokenize(gw.templates, target, req)
