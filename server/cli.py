"""`bitmoji-serve`: flags -> one server process (`bitmoji.server.server.serve`) or N (`bitmoji.server.workers`).

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

from bitmoji.server import logs
from bitmoji.server.config import parse_config

log = logging.getLogger(logs.LOGGER)

MISSING_EXTRA = (
    "bitmoji-serve needs the server's dependencies (torch, torchvision, prometheus-client...): "
    "pip install 'bitmoji-serving[serve]'"
)


def _stop_before_serving(signum, frame) -> None:
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """The console entry: serve until a signal, then end the process (0 = clean stop, 1 = could not start).

    It ends the process with os._exit once everything is flushed: torch's
    interpreter teardown takes seconds and has nothing left to clean up, and
    a rolling restart should not wait for it. Embed `bitmoji.server.server.Server` instead.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it: a reload must not end a starting server
    # Until serve() (or the supervisor) takes the signals over: a server still starting has accepted nothing,
    # so a stop request ends it at once, and cleanly (exit 0), not by the signal (-15, a "crash" to a supervisor).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_before_serving)
    config = parse_config(argv)
    logs.configure(config.log_level, config.log_format)
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
        try:
            from bitmoji.core.device import DeviceError
            from bitmoji.core.modelfile import ModelFileError
            from bitmoji.server.server import serve
        except ModuleNotFoundError as exc:
            log.error("%s (%s)", MISSING_EXTRA, exc)
            return 1
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
