"""Compute endpoints: a stock PostgreSQL 15 primary started from a pageserver basebackup (DESIGN §2.3)."""

from __future__ import annotations

from .endpoint import Endpoint, EndpointError, WalSourceUnavailable

__all__ = ["Endpoint", "EndpointError", "WalSourceUnavailable"]
