"""Structured logs (structlog), configured once per process and imported only when used.

`import structlog` costs about 100 ms on the machines we measure on (its package imports
asyncio, the stdlib bridge and the console renderer): a tenth of what a whole `reconciler
apply` of 200 environments may take. Most one-shot commands log nothing at their level
(warning, unless `-v`), so nothing here imports structlog before it has to:

- `configure(log_format=..., verbose=...)` records the settings (the command line calls it
  for every command). It applies them at once only if structlog is already imported.
- `get_logger(name)` returns a `LazyLogger`: a message below the configured level is
  dropped without importing anything; the first one that passes imports structlog,
  applies the settings, and goes through structlog's own logger from then on.
- `sync()` applies the settings if some module imported structlog directly since
  `configure` (the controller binds structlog's context variables itself). The command
  line calls it before any such module runs (`Runtime.drivers()`), so structlog never logs
  with its defaults (a colourful console renderer on stdout).

Before `configure` is called (a library user, a unit test) a `LazyLogger` simply delegates
to structlog as it is configured, like `structlog.get_logger` would.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
_METHOD_LEVELS = {
    "debug": DEBUG,
    "info": INFO,
    "warning": WARNING,
    "error": ERROR,
    "exception": ERROR,
    "critical": CRITICAL,
}


@dataclass(frozen=True)
class LogSettings:
    """How the command line wants its logs: JSON or console on stderr, info or warning."""

    log_format: str  # "json" | "console"
    verbose: bool

    @property
    def level(self) -> int:
        """The lowest level that is written."""
        return INFO if self.verbose else WARNING


_wanted: LogSettings | None = None  # what `configure` asked for
_applied: LogSettings | None = None  # what structlog was last configured with


def configure(*, log_format: str, verbose: bool) -> None:
    """Record the settings; applied now if structlog is loaded, else when first needed."""
    global _wanted
    _wanted = LogSettings(log_format=log_format, verbose=verbose)
    sync()


def sync() -> None:
    """Apply the recorded settings if structlog is imported and does not have them yet."""
    if _wanted is not None and _wanted != _applied and "structlog" in sys.modules:
        _apply(_wanted)


def settings() -> LogSettings | None:
    """The recorded settings (None before `configure`)."""
    return _wanted


def _apply(wanted: LogSettings) -> None:
    global _applied
    import logging

    import structlog

    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if wanted.log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    level = logging.INFO if wanted.verbose else logging.WARNING
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _applied = wanted


class LazyLogger:
    """A structlog logger that costs nothing until a message passes the level filter.

    The methods take what structlog's take (`log.info("env.created", env=name)`); `bind`
    returns a logger with extra context, as structlog's does.
    """

    __slots__ = ("_context", "_name", "_target")

    def __init__(self, name: str, context: Mapping[str, Any] | None = None) -> None:
        self._name = name
        self._context = dict(context or {})
        self._target: Any = None  # structlog's logger, once a message passed

    def bind(self, **context: Any) -> LazyLogger:
        """A logger that adds `context` to every message."""
        return LazyLogger(self._name, {**self._context, **context})

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> Any:
        if _wanted is not None and _METHOD_LEVELS[method] < _wanted.level:
            return None
        if self._target is None:
            if _wanted is not None and _wanted != _applied:
                _apply(_wanted)
            import structlog

            target = structlog.get_logger(self._name)
            self._target = target.bind(**self._context) if self._context else target
        return getattr(self._target, method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> Any:
        """Log at debug level."""
        return self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> Any:
        """Log at info level."""
        return self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> Any:
        """Log at warning level."""
        return self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> Any:
        """Log at error level."""
        return self._emit("error", event, fields)

    def exception(self, event: str, **fields: Any) -> Any:
        """Log at error level with the exception being handled."""
        return self._emit("exception", event, fields)

    def critical(self, event: str, **fields: Any) -> Any:
        """Log at critical level."""
        return self._emit("critical", event, fields)


def get_logger(name: str) -> LazyLogger:
    """A logger for `name` (`reconciler.engine`, ...) that imports structlog on first use."""
    return LazyLogger(name)
