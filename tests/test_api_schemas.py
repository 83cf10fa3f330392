"""Schema-driven fuzzing (schemathesis) of every HTTP API we serve, each app under a real uvicorn on 127.0.0.1.

For each operation of the node API, the gateway and the explorer, schemathesis generates valid and invalid
requests from the app's own OpenAPI schema (a bounded number per operation) and checks every answer:
- never a 5xx (a bad request is the client's fault: 4xx in one clear answer);
- the response matches what the schema declares for its status;
- a JSON API's 4xx is in the API's error shape {"error": {"message", "type", "code"}};
- an endpoint that needs credentials never answers 2xx without them.
Authenticated endpoints are fuzzed without credentials, and again with them: the node's with a request
signed by a gateway key it trusts (node.request_auth) and with the operator's token, the gateway's with an
API key. The node is the real node API over the real engine on the tiny base model.
"""

from __future__ import annotations

import io
import tarfile
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.lorax_api import LORAX_PATHS
from node.request_auth import gateway_public_key_hex, sign_request
from tests.utils.stack import gateway_key, start_daemon, start_gateway

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 30  # per operation and credential: the module stays well under 3 minutes on 2 cores
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    database=None,
)
# each app declares every status and media type it answers with, so an undeclared one fails too
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]

# who may call what, per node.api's contract: the node's generate takes only gateway-signed calls; load and
# abort, the operator or a gateway; everything else is public
NODE_GATEWAY_ONLY = {("POST", "/v1/generate")}
LOAD = ("POST", "/v1/adapters/{adapter_id}/load")
NODE_OPERATOR_OR_GATEWAY = {LOAD, ("POST", "/v1/requests/{request_id}/abort")}
NODE_OPERATOR_ONLY = {("POST", "/v1/adapters")}  # package upload (the daemon's route)
NODE_PUBLIC = {
    ("GET", "/health"),
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/v1/requests/{request_id}/receipt"),
}
# the gateway's /v1/* need an API key; /internal/heartbeat is authenticated by the node signature in its body
GATEWAY_PUBLIC = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/internal/gateway-key")}


class GatewaySigned(requests.auth.AuthBase):
    """requests' twin of node.request_auth.SignedNodeAuth: sign the prepared request (method, path, body)."""

    def __init__(self, key, node_id: str) -> None:
        self.key, self.node_id = key, node_id

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        # the node verifies over the path as its ASGI server decoded it
        r.headers.update(
            sign_request(self.key, method=r.method, path=unquote(urlsplit(r.url).path), node_id=self.node_id, body=body)
        )
        return r


def content_type(response) -> str:
    """schemathesis's Response keeps each header as a list of values."""
    value = response.headers.get("content-type") or [""]
    return value[0] if isinstance(value, list) else value


def check_answer(case, response, *, protected: bool, json_api: bool = True) -> None:
    """The checks every answer passes beyond schemathesis's own."""
    status = response.status_code
    if protected:
        assert not 200 <= status < 300, f"{case.operation.label} answered {status} without credentials"
    if json_api and 400 <= status < 500:
        assert content_type(response).startswith("application/json"), (status, response.text[:200])
        err = response.json().get("error")
        if case.operation.path in LORAX_PATHS:  # LoRAX's API answers in LoRAX's shape: {"error", "error_type"}
            assert isinstance(err, str) and err and "\n" not in err, response.text[:300]
            assert isinstance(response.json().get("error_type"), str), response.text[:300]
            return
        assert isinstance(err, dict) and {"message", "type", "code"} <= set(err), response.text[:300]
        assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"], err


def fuzz(schema, call) -> None:
    """Run `call(case)` on MAX_EXAMPLES valid and invalid cases of every operation in `schema`; fail once at
    the end naming every operation that failed (one operation's failure does not hide another's)."""
    failures, operations = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()  # a schema schemathesis cannot read fails here, naming the operation
        operations += 1
        modes = [operation.as_strategy(generation_mode=GenerationMode.POSITIVE)]
        try:
            modes.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        except Exception:  # noqa: BLE001 - nothing to negate (no parameters, no body)
            pass

        @FUZZ
        @given(case=st.one_of(modes))
        def run(case) -> None:
            call(case)

        try:
            run()
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - schemathesis's FailureGroup is a BaseExceptionGroup
            failures.append(f"{operation.label}: {type(e).__name__}: {_describe(e)[:1500]}")
    assert operations, "the schema has no operations"
    assert not failures, "\n\n".join(failures)


def _describe(e: BaseException) -> str:
    """One failure's message, with its sub-failures' (schemathesis groups the distinct failures it found)."""
    parts = [str(e).strip()] + [str(sub).strip() for sub in getattr(e, "exceptions", ())]
    return " | ".join(p for p in parts if p)


def _op(case) -> tuple[str, str]:
    return case.operation.method.upper(), case.operation.path


def gateway_schema_serving(url: str, models: list[str]) -> dict:
    """The gateway's own OpenAPI schema, with the "model" of its valid OpenAI bodies narrowed to the models it
    serves (`models`): a random name would be a 404 before anything else is looked at, so valid cases reach a
    real node; invalid cases may still name anything."""
    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    schemas = doc.get("components", {}).get("schemas", {})
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = doc["paths"][path]["post"].get("requestBody")
        assert body is not None, f"the gateway's schema declares no request body for {path}: nothing would be fuzzed"
        schema = body["content"]["application/json"]["schema"]
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        schema["properties"]["model"] = {"type": "string", "enum": models}
    return doc


def node_schema_generating(url: str) -> dict:
    """The node's own OpenAPI schema, with its generate body narrowed so that valid cases run on the engine:
    a prompt (text), no adapter (this node holds none). The published schema allows both or neither of prompt
    and prompt_token_ids, which the node refuses (400), so nearly every case would stop there."""
    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    body = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    body["properties"].pop("prompt_token_ids", None)
    body["properties"]["prompt"] = {"type": "string", "maxLength": 300}  # within the 512-token context
    body["properties"]["adapter_id"] = {"type": "null"}
    body["required"] = sorted(set(body.get("required", [])) | {"prompt"})
    return doc


# ---- the stack, once per module ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_base, tmp_path_factory):
    """A gateway, and one tiny-model node daemon (its whole app: node API and package upload) trusting the
    gateway's key and the test's own; the gateway routes to it."""
    root = tmp_path_factory.mktemp("schemas")
    gw = start_gateway(root / "gateway", tiny_base)
    signer = gateway_key()
    node = start_daemon(root / "node", tiny_base, gateway=gw, trusted=[gateway_public_key_hex(signer)])
    served = [
        m["id"]
        for m in httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=10).json()[
            "data"
        ]
    ]
    gateway_schema = schemathesis.openapi.from_dict(gateway_schema_serving(gw.url, served))
    gateway_schema.config.update(base_url=gw.url)
    generating = schemathesis.openapi.from_dict(node_schema_generating(node.url))
    generating.config.update(base_url=node.url)
    try:
        yield {
            "gateway": gw,
            "node": node,
            "signer": signer,
            "node_schema": schemathesis.openapi.from_url(node.url + "/openapi.json"),
            "node_schema_generating": generating,
            "gateway_schema": gateway_schema,
        }
    finally:
        node.stop()
        gw.stop()


# ---- the node API --------------------------------------------------------------------------------------


def test_node_api_without_credentials(stack):
    def call(case) -> None:
        response = case.call_and_validate(checks=CHECKS)
        check_answer(case, response, protected=_op(case) not in NODE_PUBLIC)
        if _op(case) not in NODE_PUBLIC:
            assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])

    fuzz(stack["node_schema"], call)


def test_node_api_signed_by_a_trusted_gateway(stack):
    auth = GatewaySigned(stack["signer"], stack["node"].node_id)

    def call(case) -> None:
        response = case.call_and_validate(checks=CHECKS, auth=auth)
        operator_only = _op(case) in NODE_OPERATOR_ONLY  # a gateway may not upload packages
        check_answer(case, response, protected=operator_only)
        # a gateway loads an adapter but may not pin or unpin one (node/api/routes/adapters.py): a body with a
        # pin is refused (whether the fuzzing draws one varied between checkouts: CI's never did, /work/main's did)
        pins = _op(case) == LOAD and isinstance(case.body, dict) and case.body.get("pin") is not None
        if pins and response.status_code == 403:
            assert response.json()["error"]["code"] == "pin_refused", response.text[:300]
        elif not operator_only:
            assert response.status_code not in (401, 403), (
                case.operation.label,
                case.path_parameters,
                response.text[:300],
            )

    fuzz(stack["node_schema_generating"], call)


def test_node_api_as_its_operator(stack):
    headers = {"Authorization": f"Bearer {stack['node'].operator_token}"}

    def call(case) -> None:
        response = case.call_and_validate(checks=CHECKS, headers=headers)
        check_answer(case, response, protected=_op(case) in NODE_GATEWAY_ONLY)  # the operator does not generate
        if _op(case) in NODE_OPERATOR_OR_GATEWAY | NODE_OPERATOR_ONLY:
            assert response.status_code not in (401, 403), (case.operation.label, response.text[:300])

    fuzz(stack["node_schema"], call)


# ---- the daemon's package upload: a body schemathesis cannot make (a tar), fuzzed by Hypothesis ----------

_MEMBER_NAMES = st.sampled_from(
    [
        "manifest.json",
        "signature.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "../escape.json",
        "/etc/abs.json",
        "sub/dir/x",
        "a" * 200,
    ]
)
_MEMBER_DATA = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 3000).map(lambda n: b"[" * n),
    st.just(b'{"format": "loramesh-adapter/1", "format": "x"}'),
    st.just(b"{}"),
)
_MEMBER_TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.REGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CHRTYPE,
    ]
)


@st.composite
def _tars(draw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for _ in range(draw(st.integers(0, 5))):
            info = tarfile.TarInfo(draw(_MEMBER_NAMES))
            info.type = draw(_MEMBER_TYPES)
            data = draw(_MEMBER_DATA) if info.type == tarfile.REGTYPE else b""
            info.size = len(data)
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = draw(st.sampled_from(["/etc/passwd", "../../x", "manifest.json"]))
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw  # sometimes cut short


def test_package_uploads_of_any_shape_are_refused_in_one_clear_answer(stack):
    node = stack["node"]
    headers = {"Authorization": f"Bearer {node.operator_token}"}
    store = str(node.daemon.store.root.resolve())

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(_tars(), st.binary(max_size=300)))
    def upload(body: bytes) -> None:
        r = requests.post(node.url + "/v1/adapters", data=body, headers=headers, timeout=60)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["message"] and "\n" not in err["message"] and store not in err["message"], err

    upload()
    assert requests.get(node.url + "/health", timeout=10).status_code == 200
    assert node.daemon.store.list() == []  # nothing was installed


# Values at the edges of what the schemas accept, tried on purpose (random generation rarely lands on them):
# a subnormal temperature divides the logits into inf and NaN in the sampler.
EDGE_SAMPLING = (
    {"temperature": 1e-308},
    {"temperature": 5e-324},
    {"top_p": 5e-324},
    {"temperature": 1e-30, "top_p": 1e-30},
    {"seed": 2**64 - 1, "top_k": 2**62},
)


@pytest.mark.parametrize("edge", EDGE_SAMPLING, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_edge_sampling_values_are_served_not_5xx(stack, edge):
    gw, node = stack["gateway"], stack["node"]
    signed = GatewaySigned(stack["signer"], node.node_id)
    r = requests.post(
        node.url + "/v1/generate", json={"prompt": "hello", "max_tokens": 3} | edge, auth=signed, timeout=60
    )
    assert r.status_code < 500, r.text[:300]
    model = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=10).json()
    r = requests.post(
        gw.url + "/v1/completions",
        json={"model": model["data"][0]["id"], "prompt": "hello", "max_tokens": 3} | edge,
        headers={"Authorization": f"Bearer {gw.api_key}"},
        timeout=60,
    )
    assert r.status_code < 500, r.text[:300]
    # a client's request must not make the gateway take the node for failed
    assert httpx.get(gw.url + "/health", timeout=10).json()["live_nodes"] == 1


def test_streamed_answers_match_their_declared_event_schema(stack):
    """Fuzzing reaches a streamed 200 only by chance: one of each, node and gateway, checked every run."""
    gw = stack["gateway"]
    node_case = stack["node_schema"]["/v1/generate"]["POST"].Case(
        body={"prompt": "hello", "max_tokens": 3, "stream": True}, media_type="application/json"
    )
    r = node_case.call_and_validate(checks=CHECKS, auth=GatewaySigned(stack["signer"], stack["node"].node_id))
    assert r.status_code == 200 and r.headers["content-type"][0].startswith("text/event-stream"), r.text[:300]
    model = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=10).json()
    gw_case = stack["gateway_schema"]["/v1/completions"]["POST"].Case(
        body={"model": model["data"][0]["id"], "prompt": "hello", "max_tokens": 3, "stream": True},
        media_type="application/json",
    )
    r = gw_case.call_and_validate(checks=CHECKS, headers={"Authorization": f"Bearer {gw.api_key}"})
    assert r.status_code == 200 and r.headers["content-type"][0].startswith("text/event-stream"), r.text[:300]


# ---- the gateway ---------------------------------------------------------------------------------------


def test_gateway_without_credentials(stack):
    def call(case) -> None:
        response = case.call_and_validate(checks=CHECKS)
        public = _op(case) in GATEWAY_PUBLIC or case.operation.path == "/internal/heartbeat"
        check_answer(case, response, protected=not public, json_api=case.operation.path != "/metrics")
        if case.operation.path.startswith("/v1/"):
            assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])

    fuzz(stack["gateway_schema"], call)


def test_gateway_with_an_api_key(stack):
    headers = {"Authorization": f"Bearer {stack['gateway'].api_key}"}

    def call(case) -> None:
        response = case.call_and_validate(checks=CHECKS, headers=headers)
        check_answer(case, response, protected=False, json_api=case.operation.path != "/metrics")
        if case.operation.path.startswith("/v1/"):
            assert response.status_code not in (401, 403), (case.operation.label, response.text[:300])

    fuzz(stack["gateway_schema"], call)


def test_every_operation_has_an_id_of_its_own(stack):
    """A client generated from an app's OpenAPI document names its methods by operationId: two operations with
    one id (a route serving several methods) make a document such generators refuse."""
    for url in (stack["gateway"].url, stack["node"].url):
        doc = httpx.get(url + "/openapi.json", timeout=10).json()
        ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
        assert len(ids) == len(set(ids)), (url, sorted({i for i in ids if ids.count(i) > 1}))


# ---- the explorer --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explorer_schema(anvil_chain, tmp_path_factory):
    from devnet.explorer import ExplorerConfig, create_app
    from tests.devnet.explorer.scenario import build_world
    from tests.utils.servers import ServerThread

    world = build_world(anvil_chain, tmp_path_factory.mktemp("explorer"))
    app = create_app(ExplorerConfig(deployment=anvil_chain.deployment_path, db_url=world.db_url))
    with ServerThread(app) as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_explorer(explorer_schema):
    def call(case) -> None:
        # pages are HTML: their errors are HTML pages too (the JSON routes' in the error shape)
        response = case.call_and_validate(checks=CHECKS, allow_redirects=False)
        json_route = case.operation.path == "/health"
        check_answer(case, response, protected=False, json_api=json_route)
        if not json_route and response.status_code >= 400:
            assert content_type(response).startswith("text/html"), (response.status_code, response.text[:200])
            # an error page, or the search page saying nothing matched (404)
            assert 'id="error-message"' in response.text or 'id="search-empty"' in response.text, response.text[-300:]

    fuzz(explorer_schema, call)
