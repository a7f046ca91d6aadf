"""Kernel drivers: one module per kind of object, each with observe() and idempotent ensure/remove.

Nothing here imports from the layers above. `types` holds the value objects and the
Protocols that the engine programs against, so the engine is testable without root.
"""
