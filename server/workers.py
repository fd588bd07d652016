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
- relays each worker's log lines (text: prefixed `worker K:`; JSON: with a
  `worker` field), and logs its own one "ready on HOST:PORT" line once every
  worker is ready;
- passes SIGTERM/SIGINT (drain, then exit) and SIGHUP (reload) to every worker,
  whatever they are doing: a worker still starting exits at once, with 0;
- restarts a worker that dies, after 1 s, then 2, 4, ... (at most 30 s) while it
  keeps dying; a worker that dies more than --worker-restart-limit times in
  --worker-restart-window-s makes the supervisor stop the others and exit 1
  (so the orchestrator restarts the pod), and so does a worker that cannot
  start before the server was ever ready (a bad model file would only crash
  again).
It never imports torch (nor anything that does): the workers start at once,
each importing torch beside the others, and the supervisor stays small.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

from bitmoji.server.config import ServerConfig, address

log = logging.getLogger("bitmoji-serve")

RESTART_DELAY_S = 1.0  # the first restart's delay; doubled for each further death in the window
MAX_RESTART_DELAY_S = 30.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY = "ready on "


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


def restart_delay(deaths: int) -> float:
    """Seconds before restarting a worker that died `deaths` times in the window (1 for the first)."""
    return min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** max(0, deaths - 1))


class Supervisor:
    def __init__(self, config: ServerConfig, argv: list[str], *, port: int):
        self.config = config
        self.argv = argv
        self.port = port
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.all_ready = asyncio.Event()
        self.done = asyncio.Event()  # a stop signal, or giving up
        self.ever_ready = False
        self.stopping = False
        self.failed = False
        self.restarts = 0
        self.deaths: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._tasks: set[asyncio.Task] = set()
        self._restarts_metric: Any = None  # a prometheus Counter, made once PROMETHEUS_MULTIPROC_DIR is set

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
            "--supervised",
        ]

    async def start(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.procs[index] = proc
        self._spawn(self._watch(index, proc))

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _relay(self, index: int, line: str) -> str:
        """Write one of the worker's lines to our stderr, marked as the worker's; returns its message."""
        if self.config.log_format == "json":
            try:
                entry = json.loads(line)
                entry["worker"] = index
                sys.stderr.write(json.dumps(entry, ensure_ascii=False) + "\n")
                return str(entry.get("message", ""))
            except (ValueError, TypeError, AttributeError):
                sys.stderr.write(json.dumps({"level": "INFO", "message": line, "worker": index}) + "\n")
                return line
        prefix = "bitmoji-serve: "
        if line.startswith(prefix):
            sys.stderr.write(f"{prefix}worker {index}: {line[len(prefix) :]}\n")
            return line[len(prefix) :]
        sys.stderr.write(f"{prefix}worker {index}: {line}\n")
        return line

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Relay the worker's lines; when it exits, restart it (or give up, see the module docstring)."""
        was_ready = False
        assert proc.stdout is not None
        async for raw in proc.stdout:
            message = self._relay(index, raw.decode(errors="replace").rstrip("\n"))
            if not was_ready and message.startswith(READY):
                was_ready = True
                self.ready.add(index)
                if len(self.ready) == self.config.workers:
                    self.ever_ready = True
                    self.all_ready.set()
        code = await proc.wait()
        self.ready.discard(index)
        _mark_dead(proc.pid)
        if self.stopping:
            if code != 0:
                log.error("worker %d exited with %d while stopping", index, code)
                self.failed = True
            return
        if not self.ever_ready:
            log.error("worker %d exited with %d before the server was ready: stopping all workers", index, code)
            self.give_up()
            return
        now = time.monotonic()
        deaths = self.deaths[index]
        deaths.append(now)
        while deaths and now - deaths[0] > self.config.worker_restart_window_s:
            deaths.popleft()
        if len(deaths) > self.config.worker_restart_limit:
            log.error(
                "worker %d died %d times in %g s (--worker-restart-limit %d): giving up, stopping all workers",
                index, len(deaths), self.config.worker_restart_window_s, self.config.worker_restart_limit,
            )  # fmt: skip
            self.give_up()
            return
        delay = restart_delay(len(deaths))
        self.restarts += 1
        if self._restarts_metric is not None:
            self._restarts_metric.inc()
        log.error("worker %d (pid %d) exited with %d: restarting it in %g s", index, proc.pid, code, delay)
        try:  # a stop signal ends the wait: SIGTERM during a restart exits at once
            await asyncio.wait_for(self.done.wait(), timeout=delay)
        except TimeoutError:
            pass
        if not self.stopping:
            await self.start(index)

    def give_up(self) -> None:
        self.failed = True
        self.signal_all(signal.SIGTERM)

    def signal_all(self, sig: int) -> None:
        if sig != signal.SIGHUP:
            self.stopping = True
            self.done.set()
            self.all_ready.set()  # wake a supervisor still waiting for its workers to get ready
        for proc in self.procs.values():
            if proc.returncode is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def wait_all(self) -> None:
        """Until every worker process (restarted ones too) has exited and every watcher is done."""
        while any(p.returncode is None for p in self.procs.values()) or self._tasks:
            await asyncio.gather(*(p.wait() for p in list(self.procs.values())), *list(self._tasks))

    def count_restarts(self) -> None:
        """Count restarts in bitmoji_worker_restarts_total (the multiprocess files: the endpoint shows it)."""
        from prometheus_client import Counter

        self._restarts_metric = Counter(
            "bitmoji_worker_restarts", "Workers the --workers supervisor restarted after they died.", registry=None
        )


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

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, supervisor.signal_all, signal.SIGHUP)
    try:
        if config.metrics_port:
            httpd = _serve_metrics(config)
            supervisor.count_restarts()
        for index in range(1, config.workers + 1):
            await supervisor.start(index)
        await supervisor.all_ready.wait()
        if not supervisor.stopping:
            metrics_url = f"http://{address(config.metrics_host, config.metrics_port)}/metrics" if httpd else "off"
            log.info(
                "ready on %s (%d workers, each sized to %d cores; metrics %s; up in %.1f s)",
                address(config.host, supervisor.port), config.workers, worker_cores(config), metrics_url,
                time.monotonic() - started,
            )  # fmt: skip
        await supervisor.done.wait()
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
