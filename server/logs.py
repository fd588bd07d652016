"""The server's log lines: `bitmoji-serve: ...` for people, or one JSON object a line for log pipelines.

Every line written while a call is being handled carries that call's request
id, trace id and model version (from `bitmoji.server.calls`), in both formats.
Log lines never contain request payloads or tokens: messages say what
happened, not what was sent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

from bitmoji.server.calls import CURRENT_CALL

LOGGER = "bitmoji-serve"


class TextFormatter(logging.Formatter):
    """`bitmoji-serve: ready on ...`; levels other than INFO say theirs: `bitmoji-serve: error: ...`;
    lines about a call end with `[request <id>]`."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{record.name}: {level}{record.getMessage()}"
        call = CURRENT_CALL.get()
        if call is not None and "[request " not in text:
            text += f" [request {call.request_id}]"
        elif ids := getattr(record, "request_ids", None):  # a line about a batch, from a model thread
            text += f" [requests {', '.join(ids)}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, message, and request_id, trace_id, model, version for a call."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = CURRENT_CALL.get()
        if call is not None:
            entry.update(method=call.method, request_id=call.request_id)
            for key in ("trace_id", "model", "version"):
                if getattr(call, key):
                    entry[key] = getattr(call, key)
        for key in ("worker", "request_ids", "trace_ids"):
            if getattr(record, key, None):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str = "text") -> logging.Logger:
    """The server's logger, to stderr, in `fmt` (text | json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log = logging.getLogger(LOGGER)
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return log
