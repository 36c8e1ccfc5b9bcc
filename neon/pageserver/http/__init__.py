"""The pageserver's management HTTP API (spec pageserver §9): aiohttp routes, request/response models.

`make_app(manager, conf)` builds the `aiohttp.web.Application`; `models` holds the pydantic bodies
(`TimelineInfo`, `TenantInfo`, create requests) with Neon's JSON field names.
"""

from .routes import ApiError, make_app

__all__ = ["ApiError", "make_app"]
