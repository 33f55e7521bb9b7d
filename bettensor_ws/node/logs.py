"""Log set-up for the command line: plain text for people, JSON lines for log shippers."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["JsonFormatter", "setup_logging"]

# attributes every LogRecord has; anything else was passed with ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, the fields given with ``extra=``, and ``exception`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: int, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as ``text`` or ``json``; replaces earlier set-up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if level > logging.DEBUG:
        # trio-websocket says every handshake detail at INFO or DEBUG; ours say what matters
        logging.getLogger("trio-websocket").setLevel(logging.WARNING)
        # the Bittensor SDK says each connection attempt at INFO; a failed chain read is ours to say
        logging.getLogger("bittensor").setLevel(logging.WARNING)
