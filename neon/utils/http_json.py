"""One blocking JSON request to a daemon's HTTP API, answered as (status, decoded body) rather
than an exception, for callers that act on the status: the compute endpoint and the tests. A
body that is not JSON comes back as text."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def request_json(
    host: str, port: int, method: str, path: str, body: object | None = None, *, timeout: float
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw) if raw else None
        except ValueError:
            return e.code, raw.decode(errors="replace")
