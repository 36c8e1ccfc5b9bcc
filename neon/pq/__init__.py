"""The Postgres wire protocol (v3.0): message codecs, sans-IO connection state machines, and a thin
asyncio server and client on top — including the client side of physical streaming replication
and Neon's pageserver feedback.

* `messages` — byte layouts of every frontend/backend message;
* `replication` — XLogData, keepalive, standby status, hot-standby and Neon 'z' feedback payloads;
* `codec` — `ServerConnection` / `ClientConnection` phase-checking state machines (no I/O);
* `server` — `PqServer`, sessions and handlers;
* `client` — `connect`, queries, COPY and replication streams.
"""

from neon.pq.errors import LocalProtocolError, PgError, ProtocolViolation, SqlState

__all__ = ["LocalProtocolError", "PgError", "ProtocolViolation", "SqlState"]
