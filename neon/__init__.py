"""A Neon-faithful storage engine for PostgreSQL 15."""
