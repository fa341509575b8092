"""Fuzzing the API on mendsrv as a real process, with a bounded number of cases.

- ``test_fuzz_registry_models``: hypothesis bodies built from each registered
  operation's parameter schema (the same models the OpenAPI document is generated
  from), valid and mutated (a required field dropped, an unknown field added, a value
  replaced by arbitrary JSON), plus arbitrary query strings on the job listing.
- ``test_fuzz_openapi_schemathesis``: schemathesis against the server's own
  /swagger/openapi.json, positive and negative cases for every operation of it.

Both assert: no 5xx, only documented status codes, and the documented body shapes.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mendsrv.ops import REGISTRY

from ..conftest import API_KEY

CASES = 150  # request bodies in all, spread over the operations
SUBMIT_STATUSES = {202, 400, 404, 409, 413, 429}


# --- a small JSON Schema -> hypothesis translation (what pydantic emits for our models) ---


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs) for s in schema[key]])
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return from_schema(schema["allOf"][0], defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema(schema | {"type": k}, defs) for k in kind])
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda s: len(s) < 300)
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 80))
    if kind == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -(2**31)))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 2**31))
        return st.integers(min_value=int(lo), max_value=int(hi))
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum", schema.get("exclusiveMinimum")),
            max_value=schema.get("maximum", schema.get("exclusiveMaximum")),
            allow_nan=False, allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required},
        )
    return ANY_JSON


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)

COMMON = {"source_bucket": st.just("media"), "dest_bucket": st.just("media")}


def body_strategy(op_name: str) -> st.SearchStrategy[tuple[str, Any]]:
    schema = REGISTRY[op_name].model.model_json_schema()
    valid = from_schema(schema, schema.get("$defs", {}))
    # buckets that exist half of the time, so that some jobs get past the download
    valid = st.tuples(valid, st.booleans()).map(lambda vb: vb[0] | ({"source_bucket": "media"} if vb[1] else {}))

    @st.composite
    def mutated(draw: Any) -> Any:
        body = dict(draw(valid))
        how = draw(st.sampled_from(["none", "drop", "unknown", "replace", "garbage"]))
        if how == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif how == "unknown":
            body[draw(st.text(min_size=1, max_size=12))] = draw(ANY_JSON)
        elif how == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(ANY_JSON)
        elif how == "garbage":
            return draw(ANY_JSON)
        return body

    return st.tuples(st.just(op_name), mutated())


def _request(base: str, method: str, path: str, body: Any = None) -> tuple[int, str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("X-API-Key", API_KEY)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get_content_type(), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get_content_type(), json.loads(err.read())


def _check_submit(status: int, ctype: str, answer: Any) -> None:
    assert status in SUBMIT_STATUSES, (status, answer)
    assert ctype == "application/json"
    if status == 202:
        assert set(answer) == {"job_id", "status", "message"} and answer["status"] == "pending"
    else:
        assert isinstance(answer.get("error"), str) and answer["error"], answer
        assert set(answer) <= {"error", "details"}
        for detail in answer.get("details", []):
            assert set(detail) == {"field", "message"}


def _fuzz_server(server_process: Any, tmp_path: Path) -> Any:
    server = server_process({"workers": {"processes": 1}})
    (tmp_path / "data" / "buckets" / "media").mkdir(parents=True)
    return server.start()


def test_fuzz_registry_models(server_process: Any, tmp_path: Path) -> None:
    server = _fuzz_server(server_process, tmp_path)
    names = sorted(REGISTRY)
    per_op = max(10, CASES // len(names))

    @settings(max_examples=per_op, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=st.sampled_from(names).flatmap(body_strategy))
    def submit(case: tuple[str, Any]) -> None:
        op_name, body = case
        _check_submit(*_request(server.url, "POST", f"/api/v1/jobs/{op_name}", body))

    submit()

    @settings(max_examples=40, deadline=None, database=None)
    @given(query=st.dictionaries(
        st.sampled_from(["status", "type", "request_id", "limit", "cursor", "x"]), st.text(max_size=30), max_size=4,
    ))
    def listing(query: dict[str, str]) -> None:
        status, ctype, answer = _request(server.url, "GET", "/api/v1/jobs?" + urllib.parse.urlencode(query))
        assert status in (200, 400), (query, status, answer)
        assert ctype == "application/json"
        assert set(answer) == ({"jobs", "next_cursor"} if status == 200 else {"error"}), answer

    listing()

    @settings(max_examples=30, deadline=None, database=None)
    @given(job_id=st.text(min_size=1, max_size=60), action=st.sampled_from(["", "/cancel", "/retry", "/deliveries"]))
    def job_routes(job_id: str, action: str) -> None:
        method = "POST" if action in ("/cancel", "/retry") else "GET"
        path = f"/api/v1/jobs/{urllib.parse.quote(job_id, safe='')}{action}"
        status, ctype, answer = _request(server.url, method, path)
        assert status in (400, 404, 405), (path, status, answer)
        assert ctype == "application/json" and isinstance(answer.get("error"), str)

    job_routes()
    log = (tmp_path / "server.log").read_text()
    assert '"level":"error"' not in log, log[-3000:]  # nothing unhandled on the server side


def _openapi_available(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/swagger/openapi.json", timeout=10) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_fuzz_openapi_schemathesis(server_process: Any, tmp_path: Path) -> None:
    import schemathesis

    server = _fuzz_server(server_process, tmp_path)
    assert _openapi_available(server.url), "the server publishes no /swagger/openapi.json"
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(server.url + "/swagger/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures: list[str] = []
    calls: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    per_op = max(5, 250 // max(1, len(operations)))
    for operation in operations:
        if re.search(r"/stream$", operation.path):
            continue  # an endless event stream: covered by its own tests

        # generate only (no shrinking): the number of requests stays bounded
        @settings(max_examples=per_op, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
        ))
        def run(case: Any) -> None:
            response = case.call(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30)
            calls.append(response.status_code)
            case.validate_response(response, checks=checks)

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:800]}")
    assert not failures, "\n\n".join(failures)
    assert len(calls) >= 5 * len(operations) - 50 and not [c for c in calls if c >= 500], calls
