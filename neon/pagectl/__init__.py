"""`pagectl`: offline inspection of WAL, layer files and metadata."""
