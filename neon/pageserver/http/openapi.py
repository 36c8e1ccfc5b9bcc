"""The management API's OpenAPI document, built from the router and the pydantic models.

Served as JSON at `/v1/doc` and at `/swagger.yml` (JSON is valid YAML), so that it always lists
exactly the routes the daemon has, with the request and response schemas the handlers use.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .models import LayerMapInfo, TenantInfo, TimelineCreateRequest, TimelineInfo

# (method, path) -> (summary, request model, response model); routes not listed get a summary only.
_DESCRIBED: dict[tuple[str, str], tuple[str, type | None, type | None]] = {
    ("GET", "/v1/tenant"): ("List tenants", None, TenantInfo),
    ("GET", "/v1/tenant/{tenant_id}"): ("Tenant status", None, TenantInfo),
    ("POST", "/v1/tenant/{tenant_id}/timeline"): (
        "Create a timeline (initdb or branch)",
        TimelineCreateRequest,
        TimelineInfo,
    ),
    ("GET", "/v1/tenant/{tenant_id}/timeline"): ("List timelines", None, TimelineInfo),
    ("GET", "/v1/tenant/{tenant_id}/timeline/{timeline_id}"): ("Timeline detail", None, TimelineInfo),
    ("GET", "/v1/tenant/{tenant_id}/timeline/{timeline_id}/layer"): ("Layer map", None, LayerMapInfo),
}
_ERROR = {
    "type": "object",
    "properties": {"msg": {"type": "string"}},
    "required": ["msg"],
}


def _schema(model: type, schemas: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON schema; ids and LSNs are our own types, which pydantic cannot describe, so
    those models get their fields listed with the Python annotations as descriptions."""
    from pydantic.errors import PydanticInvalidForJsonSchema

    try:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")  # type: ignore[attr-defined]
    except PydanticInvalidForJsonSchema:
        fields = model.model_fields  # type: ignore[attr-defined]
        return {
            "type": "object",
            "properties": {name: {"description": str(f.annotation)} for name, f in fields.items()},
            "required": [name for name, f in fields.items() if f.is_required()],
        }
    schemas.update(schema.pop("$defs", {}))
    return schema


def build_openapi(app: web.Application, version: str = "0.1") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Error": _ERROR}
    for route in app.router.routes():
        method = route.method.upper()
        if method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not path or path in ("/v1/doc", "/swagger.yml"):
            continue
        summary, request_model, response_model = _DESCRIBED.get(
            (method, path), (route.handler.__name__.replace("_", " "), None, None)
        )
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK"},
                "default": {
                    "description": "Error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in ("tenant_id", "timeline_id")
            if "{" + name + "}" in path
        ]
        if params:
            op["parameters"] = params
        for model, where in ((request_model, "request"), (response_model, "response")):
            if model is None:
                continue
            schemas[model.__name__] = _schema(model, schemas)
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            if where == "request":
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
            else:
                op["responses"]["200"]["content"] = {"application/json": {"schema": ref}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Page Server API (neon-py)", "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas},
    }


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(request.app))
