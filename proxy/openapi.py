"""The admin API's OpenAPI 3.1 document, built from its route table (`admin.ROUTES`)
and the pydantic request models the service validates with, so it cannot drift from
the handlers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp.typedefs import Handler
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import keyspace
from .schemas import REQUEST_ID

PUBLIC = frozenset(("/healthz", "/readyz", "/metrics"))  # served without the admin token


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    content_type: str = "application/json"
    idempotent: bool = False  # answers 200 with the original for a seen idempotency_key
    response: type[BaseModel] | None = None  # the success body's shape, where one is declared

    @property
    def public(self) -> bool:
        return self.path in PUBLIC


# -- OpenAPI -------------------------------------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


# account ids become Redis hash tags: the service refuses any other shape with a 400
PATH_SCHEMAS = {
    "account_id": {"type": "string", "pattern": keyspace.ACCOUNT_ID.pattern},
    "request_id": {"type": "string", "pattern": REQUEST_ID},  # an x-request-id
}


def document(routes: tuple[Operation, ...]) -> dict[str, Any]:
    """OpenAPI 3.1 from the route table and the pydantic request models."""
    models = {r.body for r in routes if r.body} | {r.query for r in routes if r.query}
    shapes = {r.response for r in routes if r.response}
    refs, top = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(shapes, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    schemas = {**top.get("$defs", {}), "Error": ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op = _operation(route, refs)
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "metering-proxy admin API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"adminToken": []}],
    }


def _operation(route: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": PATH_SCHEMAS.get(name, {"type": "string"})}
        for name in re.findall(r"\{(\w+)\}", route.path)
    ]
    if route.query:
        schema = route.query.model_json_schema()
        params += [
            {"name": name, "in": "query", "required": name in schema.get("required", ()), "schema": prop}
            for name, prop in schema["properties"].items()
        ]
    shape = refs[(route.response, "serialization")] if route.response else {}
    success = {
        "description": route.summary,
        "content": {kind: {"schema": shape} for kind in route.content_type.split(", ")},
    }
    op: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "parameters": params,
        "responses": {
            str(route.status): success,
            **(
                {"200": {**success, "description": "The original, for a seen idempotency_key"}}
                if route.idempotent
                else {}
            ),
            "default": {
                "description": "An error in OpenAI's shape",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if route.body:
        ref = refs[(route.body, "validation")]
        # a body whose fields are all optional may be left out (the same as {})
        required = bool(route.body.model_json_schema().get("required"))
        op["requestBody"] = {"required": required, "content": {"application/json": {"schema": ref}}}
    if route.public:
        op["security"] = []
    return op
