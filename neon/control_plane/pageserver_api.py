"""The pageserver (and safekeeper status) HTTP calls `neon_local` makes (spec control-plane §1.9).

This module owns turning those calls and their failures into one-line messages: an HTTP error
becomes `Error: <msg>` from the `{"msg": …}` body (or `Http error (<code>) at <url>.`), a daemon
that does not answer says which one and how to start it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

HTTP_TIMEOUT = 60.0

# Tenant settings `tenant create/config -c key:value` accept, and how their values are sent.
_DURATION_KEYS = {
    "checkpoint_timeout",
    "compaction_period",
    "gc_period",
    "pitr_interval",
    "walreceiver_connect_timeout",
    "lagging_wal_timeout",
    "evictions_low_residence_duration_metric_threshold",
}
_INT_KEYS = {
    "checkpoint_distance",
    "compaction_target_size",
    "compaction_threshold",
    "gc_horizon",
    "image_creation_threshold",
    "max_lsn_wal_lag",
    "min_resident_size_override",
}
_BOOL_KEYS = {"trace_read_requests", "gc_feedback"}
_JSON_KEYS = {"eviction_policy"}
TENANT_CONFIG_KEYS = _DURATION_KEYS | _INT_KEYS | _BOOL_KEYS | _JSON_KEYS


class ApiError(Exception):
    """A daemon refused a call or could not be reached."""


def parse_tenant_settings(settings: list[str]) -> dict[str, Any]:
    """`key:value` pairs (split at the first `:`) as the JSON fields of a tenant config request."""
    parsed: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition(":")
        if not sep:
            raise ApiError(f"invalid tenant setting {item!r}: expected key:value")
        parsed[key.strip()] = value.strip()
    unknown = sorted(set(parsed) - TENANT_CONFIG_KEYS)
    if unknown:
        raise ApiError(f"Unrecognized tenant settings: {', '.join(unknown)}")
    body: dict[str, Any] = {}
    for key, value in parsed.items():
        try:
            if key in _INT_KEYS:
                body[key] = int(value)
            elif key in _BOOL_KEYS:
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                body[key] = value.lower() == "true"
            elif key in _JSON_KEYS:
                body[key] = json.loads(value)
            else:
                body[key] = value
        except ValueError:
            raise ApiError(f"invalid value {value!r} for tenant setting '{key}'") from None
    return body


class HttpClient:
    """JSON over HTTP to one daemon, `what` naming it in messages ("pageserver 1")."""

    def __init__(self, addr: str, what: str, start_hint: str) -> None:
        self.base = f"http://{addr}"
        self.what = what
        self.start_hint = start_hint

    def request(self, method: str, path: str, body: object | None = None, timeout: float = HTTP_TIMEOUT) -> Any:
        url = self.base + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw)["msg"]
            except (ValueError, KeyError, TypeError):
                raise ApiError(f"Http error ({e.code}) at {url}.") from None
            raise ApiError(f"Error: {msg}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(f"{self.what} at {self.base} is not available ({reason}); {self.start_hint}") from None
        return json.loads(raw) if raw else None


class PageserverClient(HttpClient):
    def __init__(self, http_addr: str, ps_id: int) -> None:
        super().__init__(http_addr, f"pageserver {ps_id}", "start it with 'neon_local start' or 'pageserver start'")

    def status(self, timeout: float = HTTP_TIMEOUT) -> Any:
        return self.request("GET", "/v1/status", timeout=timeout)

    def tenant_list(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/tenant")

    def tenant_create(self, tenant_id: str | None, settings: dict[str, Any]) -> str:
        body = {**settings, **({"new_tenant_id": tenant_id} if tenant_id else {})}
        return self.request("POST", "/v1/tenant", body)

    def tenant_config(self, tenant_id: str, settings: dict[str, Any]) -> None:
        self.request("PUT", "/v1/tenant/config", {"tenant_id": tenant_id, **settings})

    def timeline_create(
        self,
        tenant_id: str,
        new_timeline_id: str,
        *,
        ancestor_timeline_id: str | None = None,
        ancestor_start_lsn: str | None = None,
        pg_version: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"new_timeline_id": new_timeline_id}
        if ancestor_timeline_id is not None:
            body["ancestor_timeline_id"] = ancestor_timeline_id
        if ancestor_start_lsn is not None:
            body["ancestor_start_lsn"] = ancestor_start_lsn
        if pg_version is not None:
            body["pg_version"] = pg_version
        return self.request("POST", f"/v1/tenant/{tenant_id}/timeline", body)

    def timeline_list(self, tenant_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/tenant/{tenant_id}/timeline")

    def timeline_detail(self, tenant_id: str, timeline_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}")


def tenant_state_text(state: Any) -> str:
    """Neon's debug form of a tenant state (`Active`, `Broken { reason: … }`) from its JSON."""
    if isinstance(state, dict) and "slug" in state:
        data = state.get("data")
        if not data:
            return str(state["slug"])
        if isinstance(data, dict):
            fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in data.items())
            return f"{state['slug']} {{ {fields} }}"
        return f"{state['slug']}({data})"
    return str(state)
