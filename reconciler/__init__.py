"""reconciler: a single-host, Kubernetes-style declarative reconciler for Linux environments."""

__version__ = "0.1.0"
