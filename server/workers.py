"""`bitmoji-serve --workers N`: N server processes sharing one port, their metrics summed on one endpoint.

One Python process serves at most about one core (the event loop holds the
GIL), so on a bigger machine the supervisor here starts N ordinary
`bitmoji-serve` processes on the same port: gRPC listens with SO_REUSEPORT
(grpc core's default on Linux), and the kernel spreads new connections over
the workers. Each worker is told its share of the cores (`--cores`), and sizes
its torch and model threads to it unless the flags say otherwise.

The supervisor itself serves no RPCs. It
- picks the port once (for `--port 0`) and holds it, bound but not listening,
  so every worker gets the same one and nobody else takes it meanwhile;
- serves /metrics for all workers with prometheus-client's multiprocess mode
  (a fresh PROMETHEUS_MULTIPROC_DIR; counters and histograms add up);
- relays each worker's log lines prefixed `worker K:`, and logs its own one
  "ready on HOST:PORT" line once every worker is ready;
- passes SIGTERM/SIGINT (drain, then exit) and SIGHUP (reload) to every worker;
- restarts a worker that dies after it was ready (a worker that cannot start
  stops them all: a bad model file would only crash again).
It never imports torch (nor anything that does): the workers start at once,
each importing torch beside the others, and the supervisor stays small.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from bitmoji.server.config import ServerConfig, address

log = logging.getLogger("bitmoji-serve")

RESTART_DELAY_S = 1.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_cores(config: ServerConfig) -> int:
    """Each worker's share of the cores (at least one): what its default thread counts are sized to."""
    return max(1, config.resolved_cores // config.workers)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) host:port with SO_REUSEPORT; returns the socket, which holds the port until closed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock


class Supervisor:
    def __init__(self, config: ServerConfig, argv: list[str], *, port: int):
        self.config = config
        self.argv = argv
        self.port = port
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.all_ready = asyncio.Event()
        self.stopping = False
        self.failed = False
        self.restarts = 0

    def command(self) -> list[str]:
        # argparse keeps the last of a repeated flag: these override the user's (--torch-threads and
        # --decode-workers, when given, stay as they are: per worker)
        return [
            sys.executable,
            "-m",
            "bitmoji.server",
            *self.argv,
            "--workers",
            "1",
            "--port",
            str(self.port),
            "--metrics-port",
            "0",
            "--cores",
            str(worker_cores(self.config)),
        ]

    async def start(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.procs[index] = proc
        asyncio.ensure_future(self._watch(index, proc))

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Relay the worker's lines; when it exits, restart it (or give up, see the module docstring)."""
        was_ready = False
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            sys.stderr.write(
                f"{line.replace('bitmoji-serve: ', f'bitmoji-serve: worker {index}: ', 1)}\n"
                if line.startswith("bitmoji-serve: ")
                else f"bitmoji-serve: worker {index}: {line}\n"
            )
            if not was_ready and line.startswith("bitmoji-serve: ready on "):
                was_ready = True
                self.ready.add(index)
                if len(self.ready) == self.config.workers:
                    self.all_ready.set()
        code = await proc.wait()
        self.ready.discard(index)
        _mark_dead(proc.pid)
        if self.stopping:
            if code != 0:
                log.error("worker %d exited with %d while stopping", index, code)
                self.failed = True
            return
        if not was_ready:
            log.error("worker %d exited with %d before it was ready: stopping all workers", index, code)
            self.failed = True
            self.signal_all(signal.SIGTERM)
            self.all_ready.set()  # wake the supervisor's wait
            return
        self.restarts += 1
        log.error("worker %d (pid %d) exited with %d: restarting it in %g s", index, proc.pid, code, RESTART_DELAY_S)
        await asyncio.sleep(RESTART_DELAY_S)
        if not self.stopping:
            await self.start(index)

    def signal_all(self, sig: int) -> None:
        if sig != signal.SIGHUP:
            self.stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def wait_all(self) -> None:
        # a restarted worker replaces its entry: wait until no entry is running
        while any(p.returncode is None for p in self.procs.values()):
            await asyncio.gather(*(p.wait() for p in list(self.procs.values())))


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (in-flight calls, queue depth) from the sums."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except OSError:
        pass


def _serve_metrics(config: ServerConfig):
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    httpd, _thread = start_http_server(config.metrics_port, addr=config.metrics_host, registry=registry)
    return httpd


async def supervise(config: ServerConfig, argv: list[str]) -> int:
    """Run `config.workers` workers until a signal; returns the exit code (0 = every worker stopped cleanly)."""
    loop = asyncio.get_running_loop()
    reserved = reserve_port(config.host, config.port)
    metrics_dir = tempfile.mkdtemp(prefix="bitmoji-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # read by the workers (and this process's collector) at import
    supervisor = Supervisor(config, argv, port=reserved.getsockname()[1])
    started = time.monotonic()
    httpd = None
    signals = {"count": 0}

    def on_stop(sig: int) -> None:
        signals["count"] += 1
        # a second signal is passed on as SIGINT twice: the workers stop at once
        supervisor.signal_all(sig if signals["count"] == 1 else signal.SIGINT)
        supervisor.all_ready.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, supervisor.signal_all, signal.SIGHUP)
    try:
        if config.metrics_port:
            httpd = _serve_metrics(config)
        for index in range(1, config.workers + 1):
            await supervisor.start(index)
        await supervisor.all_ready.wait()
        if not supervisor.stopping:
            metrics_url = f"http://{address(config.metrics_host, config.metrics_port)}/metrics" if httpd else "off"
            log.info(
                "ready on %s (%d workers, each sized to %d cores; metrics %s; up in %.1f s)",
                address(config.host, supervisor.port),
                config.workers,
                worker_cores(config),
                metrics_url,
                time.monotonic() - started,
            )
        await supervisor.wait_all()
    finally:
        supervisor.signal_all(signal.SIGTERM)
        await supervisor.wait_all()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if httpd is not None:
            httpd.shutdown()
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if supervisor.failed:
        return 1
    log.info(
        "stopped (%d workers%s)", config.workers, f", {supervisor.restarts} restarted" if supervisor.restarts else ""
    )
    return 0
