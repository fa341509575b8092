"""The OpenAPI document, generated from the app's routes and the operation registry.

It is an OpenAPI 3.0 document (served at ``/swagger/openapi.json`` by swagger.py): every operation gets its own path
(``POST /api/v1/jobs/image/resize``) whose request body is the operation's pydantic
JSON schema (translated to the OpenAPI 3.0 schema dialect, ``$defs`` hoisted into
``components/schemas``). Routes this module has no description for are still listed,
from their handler's docstring, so a new route is never missing from the document.

``GET /swagger/`` is Swagger UI, served offline from the ``swagger-ui-bundle``
package's files (no CDN), pointed at the document, with "Try it out" sending the key
entered under "Authorize" to this server.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from . import __version__
from .keys import REGISTRY
from .ops.base import Operation

API = "/api/v1"
OPENAPI_VERSION = "3.0.3"  # the Swagger UI of swagger-ui-bundle renders 3.0
SECURITY = [{"ApiKeyHeader": []}, {"BearerAuth": []}]

# --- schema translation: JSON Schema 2020-12 (pydantic) -> OpenAPI 3.0 -------------------

_OAS30_KEYWORDS = frozenset(
    {
        "title", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
        "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems",
        "maxProperties", "minProperties", "required", "enum", "type", "allOf", "oneOf",
        "anyOf", "not", "items", "properties", "additionalProperties", "description",
        "format", "default", "nullable", "discriminator", "readOnly", "writeOnly",
        "example", "deprecated",
    }
)
_NULL = {"type": "null"}


def _ref(ref: str) -> str:
    return "#/components/schemas/" + ref.rsplit("/", 1)[-1]


def to_oas30(schema: Any) -> Any:
    """Translate one JSON Schema (as pydantic writes it) into an OpenAPI 3.0 schema."""
    if not isinstance(schema, dict):
        return schema
    node = dict(schema)
    nullable = False
    # null as a type or a branch -> nullable
    types = node.get("type")
    if isinstance(types, list):
        rest = [t for t in types if t != "null"]
        nullable = len(rest) < len(types)
        if len(rest) == 1:
            node["type"] = rest[0]
        else:
            node.pop("type")
            node["anyOf"] = [{"type": t} for t in rest]
    elif types == "null":
        node.pop("type")
        node["enum"] = [None]
        nullable = True
    for combinator in ("anyOf", "oneOf"):
        branches = node.get(combinator)
        if isinstance(branches, list) and _NULL in branches:
            nullable = True
            branches = [b for b in branches if b != _NULL]
            if len(branches) == 1:
                node.pop(combinator)
                only = branches[0]
                if set(only) == {"$ref"}:
                    node["allOf"] = [only, *node.get("allOf", [])]
                else:
                    merged = to_oas30({**only, **node})
                    merged["nullable"] = True
                    return merged
            else:
                node[combinator] = branches
    if "const" in node:
        const = node.pop("const")
        node["enum"] = [const]
        nullable = nullable or const is None
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node[plain] = value
            node[bound] = True
    if "examples" in node and "example" not in node:
        examples = node["examples"]
        if isinstance(examples, list) and examples:
            node["example"] = examples[0]
    if "prefixItems" in node:
        items = [to_oas30(i) for i in node["prefixItems"]]
        unique = [i for n, i in enumerate(items) if i not in items[:n]]
        node["items"] = unique[0] if len(unique) == 1 else {"anyOf": unique}
    if isinstance(node.get("items"), bool):
        node.pop("items")
    ref = node.pop("$ref", None)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _OAS30_KEYWORDS:
            continue
        if key == "properties":
            out[key] = {name: to_oas30(sub) for name, sub in value.items()}
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_oas30(sub) for sub in value]
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_oas30(value)
        elif key == "discriminator" and isinstance(value, dict):
            out[key] = {
                "propertyName": value.get("propertyName"),
                **({"mapping": {k: _ref(v) for k, v in value["mapping"].items()}} if "mapping" in value else {}),
            }
        else:
            out[key] = value
    if nullable:
        out["nullable"] = True
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]  # OpenAPI 3.0: a nullable enum lists null
    if ref is not None:
        if not out:
            return {"$ref": _ref(ref)}
        out["allOf"] = [{"$ref": _ref(ref)}, *out.get("allOf", [])]
    return out


# What JobParams' validators check on the common fields, stated in the schema so that
# clients (and generated tests) can see it; '.' and '..' segments are in the description.
_BUCKET = {"minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z0-9][a-zA-Z0-9._-]*$"}
_KEY = {
    "minLength": 1,
    "pattern": r"^[^/\\\x00-\x1f\x7f-\x9f][^\\\x00-\x1f\x7f-\x9f]*$",
    "description_suffix": (
        "; at most 1024 bytes, no leading '/', no backslash or control character, "
        "no '.' or '..' path segment"
    ),
}
COMMON_FIELD_RULES: dict[str, dict[str, Any]] = {
    "source_bucket": _BUCKET, "dest_bucket": _BUCKET, "source_key": _KEY, "dest_key": _KEY,
    "webhook_url": {"pattern": r"^https?://[^\s/?#]+"},
}


def _with_common_rules(schema: dict[str, Any]) -> dict[str, Any]:
    props = schema.get("properties", {})
    for name, rules in COMMON_FIELD_RULES.items():
        prop = props.get(name)
        if not isinstance(prop, dict) or prop.get("type") != "string":
            continue
        for key, value in rules.items():
            if key == "description_suffix":
                prop["description"] = prop.get("description", "") + value
            else:
                prop.setdefault(key, value)
    return schema


def _op_schema_name(op_name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[/_\-]", op_name)) + "Params"


def operation_schemas(ops: list[Operation]) -> tuple[dict[str, str], dict[str, Any]]:
    """(operation name -> its schema's component name, component schemas)."""
    models = list(dict.fromkeys(op.model for op in ops))
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    defs: dict[str, Any] = top.get("$defs", {})
    model_name = {m: refs[(m, "validation")]["$ref"].rsplit("/", 1)[-1] for m in models}
    # rename each operation's own model after the operation (ImageResizeParams)
    rename: dict[str, str] = {}
    for op in ops:
        old = model_name[op.model]
        new = _op_schema_name(op.name)
        if old not in rename and new not in defs and new not in rename.values():
            rename[old] = new
    schemas = {rename.get(name, name): _renamed(to_oas30(schema), rename) for name, schema in defs.items()}
    by_op = {op.name: rename.get(model_name[op.model], model_name[op.model]) for op in ops}
    for name in set(by_op.values()):
        _with_common_rules(schemas[name])
    return by_op, schemas


def _renamed(node: Any, rename: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _renamed(v, rename) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            out["$ref"] = "#/components/schemas/" + rename.get(name, name)
        return out
    if isinstance(node, list):
        return [_renamed(v, rename) for v in node]
    return node


def example_body(op: Operation, schema: dict[str, Any]) -> dict[str, Any]:
    """A request body a user can send as is from "Try it out" (given a source object)."""
    examples = op.model.model_json_schema().get("examples")
    if isinstance(examples, list) and examples and isinstance(examples[0], dict):
        return dict(examples[0])
    ext = {"image": ".jpg", "video": ".mp4", "audio": ".mp3"}.get(op.family, "")
    body: dict[str, Any] = {
        "source_bucket": "my-bucket",
        "source_key": f"input{ext}",
        "dest_bucket": "my-bucket",
        "dest_key": f"output{ext}",
    }
    for name in schema.get("required", []):
        if name in body:
            continue
        prop = schema.get("properties", {}).get(name, {})
        if "default" in prop:
            body[name] = prop["default"]
        elif prop.get("enum"):
            body[name] = prop["enum"][0]
        elif prop.get("type") in ("integer", "number"):
            body[name] = prop.get("minimum", 1)
        elif prop.get("type") == "boolean":
            body[name] = False
        else:
            body[name] = "string"
    return body


# --- fixed parts of the document --------------------------------------------------------


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


RESPONSES: dict[str, dict[str, Any]] = {
    "BadRequest": _error_response("Invalid parameters, unknown fields or bad JSON"),
    "Unauthorized": _error_response("Missing or wrong API key"),
    "NotFound": _error_response("Unknown job or operation"),
    "Conflict": _error_response(
        "The job's state does not allow this, or an Idempotency-Key was reused with another body"
    ),
    "PayloadTooLarge": _error_response("Request body larger than server.max_body_bytes"),
    "QueueFull": _error_response("The queue is full (limits.max_queue pending jobs); retry later"),
    "InternalError": _error_response("Internal error; the server log has details"),
    "Unavailable": _error_response("A dependency is unavailable"),
}
_CODE_RESPONSE = {
    "400": "BadRequest", "401": "Unauthorized", "404": "NotFound", "409": "Conflict",
    "413": "PayloadTooLarge", "429": "QueueFull", "500": "InternalError", "503": "Unavailable",
}

_TIMESTAMP = {"type": "string", "format": "date-time", "example": "2026-12-03T16:00:00.000Z"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "A sentence saying what went wrong"},
            "details": {
                "type": "array",
                "description": "Validation errors, one per field",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
    "JobStatus": {
        "type": "string",
        "enum": ["pending", "processing", "completed", "failed", "cancelled"],
        "description": "pending → processing → completed | failed; cancelled from either of the first two",
    },
    "JobAccepted": {
        "type": "object",
        "required": ["job_id", "status", "message"],
        "properties": {
            "job_id": {"type": "string", "format": "uuid"},
            "status": {
                "allOf": [{"$ref": "#/components/schemas/JobStatus"}],
                "description": "pending; for a repeated Idempotency-Key, the first job's current status",
            },
            "message": {"type": "string", "example": "Job queued for processing"},
        },
    },
    "Output": {
        "type": "object",
        "required": ["bucket", "key", "size", "content_type"],
        "additionalProperties": True,
        "properties": {
            "bucket": {"type": "string"},
            "key": {"type": "string"},
            "size": {"type": "integer"},
            "content_type": {"type": "string"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
        },
    },
    "Job": {
        "type": "object",
        "required": [
            "job_id", "type", "status", "progress", "params", "request_id", "created_at",
            "started_at", "finished_at", "attempts", "error", "result",
        ],
        "properties": {
            "job_id": {"type": "string", "format": "uuid"},
            "type": {"type": "string", "example": "image/resize"},
            "status": {"$ref": "#/components/schemas/JobStatus"},
            "progress": {"type": "integer", "minimum": 0, "maximum": 100},
            "params": {"type": "object", "additionalProperties": True, "description": "As submitted"},
            "request_id": {"type": "string", "nullable": True},
            "created_at": _TIMESTAMP,
            "started_at": {**_TIMESTAMP, "nullable": True},
            "finished_at": {**_TIMESTAMP, "nullable": True},
            "attempts": {"type": "integer", "minimum": 0},
            "error": {"type": "string", "nullable": True, "description": "Why the job failed, for a user to act on"},
            "result": {
                "type": "object",
                "nullable": True,
                "additionalProperties": True,
                "properties": {"outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Output"}}},
            },
        },
    },
    "JobList": {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "next_cursor": {"type": "string", "nullable": True, "description": "Pass as cursor for the next page"},
        },
    },
    "DeliveryList": {
        "type": "object",
        "required": ["deliveries"],
        "properties": {
            "deliveries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "attempt": {"type": "integer"},
                        "at": _TIMESTAMP,
                        "status_code": {"type": "integer", "nullable": True},
                        "error": {"type": "string", "nullable": True},
                        "next_retry_at": {**_TIMESTAMP, "nullable": True},
                    },
                },
            }
        },
    },
    "OperationList": {
        "type": "object",
        "required": ["operations"],
        "properties": {
            "operations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "example": "image/resize"},
                        "description": {"type": "string"},
                        "resource": {"type": "string", "enum": ["cpu", "ffmpeg"]},
                        "parameters": {"type": "object", "description": "JSON Schema of the request body"},
                    },
                },
            }
        },
    },
    "HealthCheck": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "fail"]}, "error": {"type": "string"}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "checks", "version"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unhealthy"]},
            "checks": {
                "type": "object",
                "properties": {
                    name: {"$ref": "#/components/schemas/HealthCheck"}
                    for name in ("database", "storage", "ffmpeg", "workers")
                },
            },
            "version": {"type": "string"},
            "error": {"type": "string", "description": "Present when unhealthy: the failing checks"},
        },
    },
}


def _json(schema_ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/{_CODE_RESPONSE[str(c)]}"} for c in codes}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_JOB_LOCATION = {"Location": {"description": "The job's URL", "schema": {"type": "string"}}}

# What the document says about each known route, keyed by (method, path template).
ROUTES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", f"{API}/operations"): {
        "tags": ["operations"],
        "summary": "List the operations and their parameters",
        "responses": {"200": _json("OperationList", "The catalogue, from the registry"), **_errors(401, 500)},
    },
    ("GET", f"{API}/jobs"): {
        "tags": ["jobs"],
        "summary": "List jobs, newest first",
        "parameters": [
            _query("status", "Only jobs in this status", {"$ref": "#/components/schemas/JobStatus"}),
            _query("type", "Only jobs of this operation, e.g. image/resize", {"type": "string"}),
            _query("request_id", "Only jobs with this request_id", {"type": "string"}),
            _query("limit", "Page size", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}),
            _query("cursor", "next_cursor of the previous page", {"type": "string"}),
        ],
        "responses": {"200": _json("JobList", "One page of jobs"), **_errors(400, 401, 500)},
    },
    ("GET", API + "/jobs/{job_id}"): {
        "tags": ["jobs"],
        "summary": "Get a job",
        "responses": {"200": _json("Job", "The job resource"), **_errors(401, 404, 500)},
    },
    ("POST", API + "/jobs/{job_id}/cancel"): {
        "tags": ["jobs"],
        "summary": "Cancel a pending or processing job",
        "responses": {"200": _json("Job", "The cancelled job"), **_errors(401, 404, 409, 500)},
    },
    ("POST", API + "/jobs/{job_id}/retry"): {
        "tags": ["jobs"],
        "summary": "Run a failed or cancelled job again",
        "responses": {
            "202": {**_json("Job", "The job, pending again"), "headers": _JOB_LOCATION},
            **_errors(401, 404, 409, 429, 500),
        },
    },
    ("GET", API + "/jobs/{job_id}/deliveries"): {
        "tags": ["jobs"],
        "summary": "List the webhook delivery attempts of a job",
        "responses": {"200": _json("DeliveryList", "Every attempt, oldest first"), **_errors(401, 404, 500)},
    },
    ("GET", API + "/jobs/{job_id}/stream"): {
        "tags": ["jobs"],
        "summary": "Follow a job as Server-Sent Events",
        "description": (
            "`status` events (data: the job resource) for every transition and `progress` events "
            '(data: {"job_id", "progress", "phase"}); the stream ends after the terminal event. '
            "Reconnect with `Last-Event-ID` to get what was missed."
        ),
        "parameters": [
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "schema": {"type": "string"}, "description": "Resume after this event id (an id this stream sent; anything else reads as none)"}
        ],
        "responses": {
            "200": {
                "description": "An event stream",
                "content": {
                    "text/event-stream": {
                        "example": 'id: 12\nevent: progress\ndata: {"job_id": "…", "progress": 40, "phase": "processing"}\n\n'
                    }
                },
            },
            **_errors(401, 404, 500),
        },
    },
    ("GET", "/health"): {
        "tags": ["operability"],
        "summary": "Dependency checks (no authentication)",
        "security": [],
        "responses": {
            "200": _json("Health", "Every check passes"),
            "503": _json("Health", "A check fails; error names it"),
        },
    },
    ("GET", "/metrics"): {
        "tags": ["operability"],
        "summary": "Prometheus metrics (no authentication)",
        "security": [],
        "responses": {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        },
    },
}

SUBMIT_TEMPLATE = API + "/jobs/{family}/{operation}"


def _submit_operation(op: Operation, schema_name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": [op.family],
        "operationId": "submit_" + re.sub(r"\W", "_", op.name),
        "summary": op.description.splitlines()[0] if op.description else f"Submit a {op.name} job",
        "description": (
            f"{op.description}\n\nRuns on the `{op.resource.value}` workers. Answers `202` at once; "
            "follow the job with `GET /api/v1/jobs/{job_id}`, its event stream or a webhook."
        ),
        "parameters": [
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "minLength": 1, "maxLength": 255},
             "description": "Repeat a submission safely: the same key and body return the first job"},
            {"$ref": "#/components/parameters/RequestId"},
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{schema_name}"},
                    "example": example_body(op, schema),
                }
            },
        },
        "responses": {
            "202": {**_json("JobAccepted", "Job queued for processing"), "headers": _JOB_LOCATION},
            **_errors(400, 401, 404, 409, 413, 429, 500, 503),
        },
        "security": SECURITY,
    }


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"\{([^}:]+)", path)
    ]


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of ``app``: its routes and its registry."""
    ops = list(app[REGISTRY].values())
    op_schema, component_schemas = operation_schemas(ops)
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for resource in app.router.resources():
        template = resource.canonical
        if not (template.startswith(API + "/") or template in ("/health", "/metrics")):
            continue
        for route in resource:
            method = route.method.upper()
            if method in ("HEAD", "OPTIONS", "*"):
                continue
            if (method, template) == ("POST", SUBMIT_TEMPLATE):
                for op in ops:
                    path = f"{API}/jobs/{op.name}"
                    schema = component_schemas[op_schema[op.name]]
                    paths.setdefault(path, {})["post"] = _submit_operation(op, op_schema[op.name], schema)
                continue
            meta = copy.deepcopy(ROUTES.get((method, template)))
            if meta is None:  # a route this module does not know: list it all the same
                doc = (getattr(route.handler, "__doc__", None) or "").strip()
                meta = {
                    "summary": doc.splitlines()[0] if doc else f"{method} {template}",
                    "responses": {"200": {"description": "Success"}, **_errors(401, 500)} if template.startswith(API)
                    else {"200": {"description": "Success"}},
                }
            name = getattr(route.handler, "__name__", "") or re.sub(r"\W+", "_", f"{method}_{template}").strip("_")
            while name in operation_ids:
                name += "_" + method.lower()
            operation_ids.add(name)
            meta["operationId"] = name
            params = _path_parameters(template) + meta.get("parameters", [])
            if template.startswith(API):
                params.append({"$ref": "#/components/parameters/RequestId"})
                meta.setdefault("security", SECURITY)
            if params:
                meta["parameters"] = params
            paths.setdefault(template, {})[method.lower()] = meta
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Mend Media Processing Engine",
            "version": __version__,
            "description": (
                "Asynchronous image, video and audio jobs from S3 to S3. Submit a job, get `202` "
                "with a `job_id`, then poll, follow its event stream, or receive a webhook.\n\n"
                "Every `/api/v1` route needs an API key, as `X-API-Key: <key>` or "
                "`Authorization: Bearer <key>`. Every response carries `X-Request-ID` (yours, if you "
                "sent one). Errors are `{\"error\": \"<sentence>\"}`."
            ),
        },
        "tags": [
            {"name": "jobs", "description": "Follow, list, cancel and retry jobs"},
            *({"name": family, "description": f"Submit {family} jobs"} for family in sorted({op.family for op in ops})),
            {"name": "operations", "description": "The catalogue"},
            {"name": "operability", "description": "Health and metrics"},
        ],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {**SCHEMAS, **component_schemas},
            "responses": RESPONSES,
            "parameters": {
                "RequestId": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": (
                        "Your id for this request (up to 200 printable characters; otherwise the server makes "
                        "one): echoed in the response, in every log line, and the default request_id of a job"
                    ),
                }
            },
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "BearerAuth": {"type": "http", "scheme": "bearer", "description": "The API key as a bearer token"},
            },
        },
    }
