"""Stock PostgreSQL 15 formats: WAL, records and their payloads, pg_control, SLRUs, pages."""
