"""WAL redo: the helper protocol, the helper process, the per-tenant manager, Neon's own records."""
