"""Adapters: load (and pin) one into a slot; upload a package (the daemon's app only)."""

from __future__ import annotations

import asyncio
import logging
import tempfile

from fastapi import APIRouter, Request

from node.adapters import PackageError
from node.api.deps import Node, Operator, OperatorOrGateway
from node.api.errors import ApiError, adapter_error
from node.api.models import IdPath, LoadBody, json_schema_body, parse_body
from node.engine import AdapterError
from node.upload import SPOOL_IN_MEMORY_BYTES, UploadRefused

log = logging.getLogger(__name__)

MAX_LOAD_BODY_BYTES = 4096

router = APIRouter()
upload_router = APIRouter()  # included by create_app only when it is given a PackageInstaller


@router.post("/v1/adapters/{adapter_id}/load", openapi_extra=json_schema_body(LoadBody, required=False))
async def load_adapter(adapter_id: IdPath, request: Request, node: Node, caller: OperatorOrGateway) -> dict:
    """Operator, or a trusted gateway (it prefetches the adapters it routes). Only the operator pins or unpins:
    a gateway (any settler's that said hello) pinning one adapter a slot would leave none for the others', and
    could unpin what the operator pinned."""
    body = parse_body(await request.body(), LoadBody, max_bytes=MAX_LOAD_BODY_BYTES, optional=True)
    pin = body.pin if body is not None else None
    if pin is not None and caller is not None:
        raise ApiError(
            403, "only the node's operator pins or unpins an adapter; a gateway only loads it", "pin_refused"
        )
    try:
        slot = await node.engine.load_adapter(adapter_id, pin)
    except AdapterError as e:
        raise adapter_error(e) from e
    pinned = any(a["adapter_id"] == adapter_id and a["pinned"] for a in node.engine.status()["resident_adapters"])
    return {"adapter_id": adapter_id, "slot": slot, "pinned": pinned}


@upload_router.post("/v1/adapters")
async def upload(request: Request, node: Node, _operator: Operator):
    """Operator only (Authorization: Bearer <token>): install a package and seed it to the mesh."""
    uploads = node.uploads
    limit = uploads.max_bytes
    # capped while it arrives (the body-size middleware refuses a larger Content-Length before this runs)
    data = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES, dir=uploads.spool_dir)
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"upload is over the {limit}-byte limit", "request_too_large")
            data.write(chunk)
        data.seek(0)
        pkg = await asyncio.to_thread(uploads.install, data)
    except PackageError as e:
        raise ApiError(400, uploads.without_paths(str(e)), "package_refused") from None
    except UploadRefused as e:
        raise ApiError(403, str(e), "adapter_unregistered") from None
    except OSError as e:
        log.error("cannot store an uploaded package: %s", e)
        raise ApiError(500, "the node could not store the package (see its log)", "store_failed") from None
    finally:
        data.close()
    if uploads.announce is not None:
        await uploads.announce(pkg.adapter_id)
    log.info("accepted package %s (%s) from a publisher", pkg.adapter_id, pkg.name)
    return {
        "adapter_id": pkg.adapter_id,
        "name": pkg.name,
        "signer": pkg.signer,
        "announced": uploads.announce is not None,
    }
