"""cli layer (see architecture.md)."""
