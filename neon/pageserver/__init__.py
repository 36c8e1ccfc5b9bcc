"""The pageserver: the key space, stored values, WAL ingest, layers, timelines and the page service.

Modules here may use `neon.postgres`, `neon.utils`, `neon.walredo` and `neon.remote_storage`, never
the other daemons.
"""
