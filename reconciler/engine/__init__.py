"""engine layer (see architecture.md)."""
