"""manifests layer (see architecture.md)."""
