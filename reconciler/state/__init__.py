"""state layer (see architecture.md)."""
