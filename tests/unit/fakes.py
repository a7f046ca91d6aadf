"""Test doubles shared by unit tests."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that only move when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
