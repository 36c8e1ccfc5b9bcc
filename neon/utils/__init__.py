"""Small shared building blocks: LSNs, ids, crash-safe files, logging."""
