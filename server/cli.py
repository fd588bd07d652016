"""`bitmoji-serve`: flags -> one server process (`bitmoji.server.main.serve`) or N of them (`bitmoji.server.workers.supervise`).

This module and everything the `--workers` supervisor imports stay free of
torch: the supervisor only starts, watches and signals its workers, so it
starts them at once instead of after the ~2 s torch import, and holds ~22 MB
instead of ~520.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import warnings

from bitmoji.server.config import parse_config

log = logging.getLogger("bitmoji-serve")


class _Formatter(logging.Formatter):
    """`bitmoji-serve: ready on ...`; other levels than INFO say theirs: `bitmoji-serve: error: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{record.name}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """The console entry: serve until a signal, then end the process (0 = clean stop, 1 = could not start).

    It ends the process with os._exit once everything is flushed: torch's
    interpreter teardown takes seconds and has nothing left to clean up, and
    a rolling restart should not wait for it. Embed `bitmoji.server.main.serve()` instead.
    """
    signal.signal(
        signal.SIGHUP, signal.SIG_IGN
    )  # until serve() handles it: a reload request must not end a starting server
    config = parse_config(argv)
    configure_logging(config.log_level)
    code = 0
    if config.workers > 1:
        from bitmoji.server.workers import supervise

        argv = sys.argv[1:] if argv is None else list(argv)
        try:
            code = asyncio.run(supervise(config, argv))
        except OSError as exc:  # the port is taken, say
            log.error("%s", exc)
            code = 1
    else:
        from bitmoji.core.device import DeviceError
        from bitmoji.core.modelfile import ModelFileError
        from bitmoji.server.main import serve

        # Pillow warns about odd bytes in callers' images (corrupt EXIF...): the caller's problem, answered with a
        # status; as log lines they would let anyone flood the log.
        warnings.filterwarnings("ignore", module=r"PIL\.")
        try:
            asyncio.run(serve(config))
        except (ModelFileError, DeviceError, RuntimeError, OSError) as exc:  # SecurityConfigError is a RuntimeError
            log.error("%s", exc)
            code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
