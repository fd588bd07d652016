"""One server process's life: `Server.start`, `warm`, `drain`, `stop`; `serve` runs them until a signal.

- start: the gRPC port opens with health NOT_SERVING (so probes get an answer
  during warm-up), the metrics endpoint too;
- warm: the models are loaded, verified and warmed up (`ModelManager.start`);
  then health turns SERVING and one "ready on HOST:PORT" line is logged;
- drain (SIGTERM/SIGINT): health turns NOT_SERVING at once, and the server
  keeps serving for --shutdown-delay-s, so load balancers and clients that
  watch health move away first; then new calls are refused with UNAVAILABLE
  (safe to retry elsewhere, never CANCELLED) while every accepted call is
  answered, up to --grace-period-s;
- stop: the port closes (GOAWAY), model threads stop, one "stopped" line.
A second signal stops at once. SIGHUP reloads the model file, or rescans the
repository (see `bitmoji.server.models`). The command itself is `bitmoji.server.cli`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bitmoji.core.device import resolve_device
from bitmoji.core.modelfile import ModelFileError
from bitmoji.server import tracing
from bitmoji.server.classifier import CLASSIFIER, MODEL_REPOSITORY, ClassifierServicer, ModelRepositoryServicer
from bitmoji.server.config import ServerConfig, address, cpu_count
from bitmoji.server.engine import Engine
from bitmoji.server.interceptor import PHASE_DRAINING, PHASE_SERVING, CallInterceptor, CallTracker
from bitmoji.server.metrics import Metrics
from bitmoji.server.models import ModelManager, State
from bitmoji.server.repository import RepositoryError
from bitmoji.server.security import TokenCheck, describe, server_credentials, tokens
from bitmoji.server.serialization import add_timed
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("bitmoji-serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WATCH_FLUSH_S = 0.2
PROCESS_METRICS_S = 5.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_torch_threads(device: torch.device, cores: int | None = None) -> int:
    """Half the cores on CPU (the rest decode and run gRPC), one with CUDA.

    The forward pass shares the machine with the other model threads' decoding
    and the event loop; OpenMP threads that outnumber the free cores spin and
    stall each other (measured on a busy 2-core box: the CNN at batch 1 took 6 ms with
    one thread, 325 ms with two).
    """
    return max(1, (cores or cpu_count()) // 2) if device.type == "cpu" else 1


def health_name(model: str) -> str:
    """The health service name of one model: `bitmoji.v1.Classifier/<model>` (SERVING while it has a READY version)."""
    return f"{CLASSIFIER}/{model}"


class Server:
    """A gRPC server over one engine. Construct, then `await start()`, `warm()`, and at the end `drain()`, `stop()`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = metrics = Metrics()
        self.tracker = CallTracker(config.max_concurrent_rpcs)
        self.device = resolve_device(config.device)
        self.torch_threads = config.torch_threads or default_torch_threads(self.device, config.resolved_cores)
        self.manager = ModelManager(
            config, metrics, self.device, torch_threads=self.torch_threads, on_change=self._model_changed
        )
        # A probe's forward and backward are memory-bound passes over the weights and their gradients: its one
        # thread gets all of this process's cores (the setting is per thread; the model threads keep theirs).
        cpu = self.device.type == "cpu"
        probe_threads = max(self.torch_threads, config.resolved_decode_workers) if cpu else self.torch_threads
        self._probe_pool = ThreadPoolExecutor(
            1, thread_name_prefix="bitmoji-probe", initializer=torch.set_num_threads, initargs=(probe_threads,)
        )
        self.engine = Engine(
            config, self.manager, metrics, probe_pool=self._probe_pool, torch_threads=self.torch_threads
        )
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._services: tuple[str, ...] = ()
        self._httpd = None
        self._background: list[asyncio.Task] = []
        self._tokens: tuple[str | None, str | None, str | None] = (None, None, None)
        self._tracing = False  # tracing turned on by this server (from OTEL_*): flushed at stop

    @property
    def serving(self) -> bool:
        return self.engine.serving

    async def start(self) -> None:
        """Open the port (health NOT_SERVING) and the metrics endpoint; raise on a misconfiguration."""
        config, metrics = self.config, self.metrics
        # Certificates, tokens and tracing first: a misconfigured server fails before the (slow) model load.
        credentials = server_credentials(config)
        if not tracing.enabled():
            try:
                self._tracing = tracing.configure_from_environment()
            except (ValueError, ImportError) as exc:
                raise RuntimeError(str(exc)) from None
        self._tokens = tokens(config)
        if self._tokens[0] and credentials is None and config.host not in LOCAL_HOSTS:
            log.warning(
                "a bearer token without TLS on %s: tokens cross the network in clear text (add --tls-cert/--tls-key)",
                config.host,
            )
        threads = self.torch_threads
        torch.set_num_threads(threads)
        # torch keeps MKL's thread count per thread, and a new thread's GEMMs use every core: every thread that
        # runs the model (loading, --optimize's timing, warm-up, reload, probes, the model threads) starts with this.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="bitmoji", initializer=torch.set_num_threads, initargs=(threads,))
        )
        metrics.torch_threads.set(threads)
        metrics.set_build_info(torch.__version__)
        checks = TokenCheck(*self._tokens) if any(self._tokens) else None
        server = self._server = grpc.aio.server(
            interceptors=[CallInterceptor(metrics, self.tracker, checks)],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.server.max_pending_requests", config.max_pending_rpcs),
            ],
        )
        timing = metrics.serialization_duration
        add_timed(pb_grpc.add_ClassifierServicer_to_server, ClassifierServicer(self.engine), server, timing)
        add_timed(pb_grpc.add_ModelRepositoryServicer_to_server, ModelRepositoryServicer(self.engine), server, timing)
        self._services = (CLASSIFIER, MODEL_REPOSITORY)
        if config.open_inference_protocol:
            # The Open Inference Protocol (KServe V2) beside it. Imported here, not at the top: tritonclient ships
            # the same `inference.*` protobuf messages, and a process that imports this module may load tritonclient.
            from bitmoji.server import kserve

            kserve_servicer = kserve.KServeServicer(self.engine)
            add_timed(kserve.kpb_grpc.add_GRPCInferenceServiceServicer_to_server, kserve_servicer, server, timing)
            self._services += (kserve.SERVICE_NAME,)
        for name in ("", *self._services):
            await self._health.set(name, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection([*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self._httpd = metrics.serve(config.metrics_host, config.metrics_port) if config.metrics_port else None
        listen = address(config.host, config.port)
        self.port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
        await server.start()

    async def warm(self) -> None:
        """Load the models (verified and warmed up), turn health SERVING and log the ready line."""
        config = self.config
        try:
            await self.manager.start()
        except RepositoryError as exc:
            raise ModelFileError(str(exc)) from None
        if not self.manager.all_loaded():
            failed = [
                f"{s.name} version {v.version}: {v.reason}"
                for s in self.manager.statuses()
                for v in s.versions
                if v.state is State.FAILED
            ]
            if not config.model_repository:  # one file that cannot serve is a server that cannot start
                raise ModelFileError(failed[0] if failed else f"{config.model}: not loaded")
            if failed or config.model_control_mode != "explicit":
                log.warning("no model version is READY: %s", "; ".join(failed) or "the repository has none")
        if config.warmup_delay_s:
            await asyncio.sleep(config.warmup_delay_s)
        self.engine.serving = True
        self.tracker.phase = PHASE_SERVING
        self.metrics.serving.set(1)
        await self._set_health()
        if config.model_repository and config.model_control_mode == "poll" or config.reload_poll_s:
            self._spawn(self.manager.watch())
        if self.metrics.process._gauges:  # --workers: per-worker process metrics, refreshed here
            self._spawn(self._update_process_metrics())
        metrics_url = f"http://{address(config.metrics_host, config.metrics_port)}/metrics" if self._httpd else "off"
        reload_mode = (
            f"repository {config.model_control_mode}"
            + (f" every {config.repository_poll_s:g} s" if config.model_control_mode == "poll" else "")
            if config.model_repository
            else f"SIGHUP or file change (every {config.reload_poll_s:g} s)"
            if config.reload_poll_s
            else "SIGHUP"
        )
        log.info(
            "ready on %s (models %s; device %s, torch threads %d, metrics %s, %s, reload on %s)",
            address(config.host, self.port or 0), self.manager.summary(), self.device, self.torch_threads, metrics_url,
            describe(config, *self._tokens), reload_mode,
        )  # fmt: skip

    def _spawn(self, coroutine) -> None:
        self._background.append(asyncio.ensure_future(coroutine))

    async def _update_process_metrics(self) -> None:
        while True:
            self.metrics.process.update()
            await asyncio.sleep(PROCESS_METRICS_S)

    def _model_changed(self, name: str) -> None:
        """A model's versions changed state: its health (and the server's) follow, once the server serves."""
        if self.engine.serving:
            asyncio.ensure_future(self._set_health())

    async def _set_health(self) -> None:
        serving = self.engine.serving
        for name in ("", *self._services):
            await self._health.set(name, SERVING if serving else NOT_SERVING)
        for model in self.manager.names():
            await self._health.set(
                health_name(model), SERVING if serving and self.manager.is_ready(model) else NOT_SERVING
            )

    def reload(self, trigger: str) -> None:
        """SIGHUP: reload the model file / rescan the repository, in the background (one at a time)."""
        self.manager.spawn(self.manager.reload(trigger))

    async def drain(self) -> bool:
        """NOT_SERVING, serve on for --shutdown-delay-s, then refuse new calls and answer the accepted ones.

        Returns True when every accepted call was answered within --grace-period-s.
        """
        config = self.config
        for task in self._background:
            task.cancel()
        await self.manager.stop_background()  # no model swap during the drain
        self.engine.serving = False
        self.metrics.serving.set(0)
        await self._health.enter_graceful_shutdown()  # NOT_SERVING, and stays so
        if config.shutdown_delay_s:
            log.info("stopping: health NOT_SERVING; serving on for %g s (--shutdown-delay-s)", config.shutdown_delay_s)
            await asyncio.sleep(config.shutdown_delay_s)
        self.tracker.phase = PHASE_DRAINING
        log.info(
            "stopping: new calls refused (UNAVAILABLE), draining %d accepted calls (grace period %g s)",
            self.tracker.active, config.grace_period_s,
        )  # fmt: skip
        return await self.tracker.drained(config.grace_period_s)

    async def stop(self) -> None:
        """Close the port and stop the model threads; calls still running are cancelled."""
        # Watch streams learn NOT_SERVING on their next loop turn; a moment lets that reach the wire
        # before the cancel below, or a load balancer watching health only sees the connection drop.
        await asyncio.sleep(WATCH_FLUSH_S)
        if self._server is not None:
            await self._server.stop(0.1)
        await asyncio.to_thread(self.manager.close, self.config.grace_period_s)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        if self._httpd is not None:
            await asyncio.to_thread(self._httpd.shutdown)
        if self._tracing:
            await asyncio.to_thread(tracing.shutdown)


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM/SIGINT; raises ModelFileError (or RuntimeError) when it cannot start."""
    loop = asyncio.get_running_loop()
    pending_hup: list[str] = []
    stop = asyncio.Event()
    signals = {"count": 0}

    def on_hup() -> None:  # SIGHUP's default action ends the process: caught from the start
        if server.serving:
            server.reload("SIGHUP")
        else:
            pending_hup.append("SIGHUP")
            log.info("SIGHUP before ready: the model is reloaded once the server is ready")

    def on_signal() -> None:
        signals["count"] += 1
        stop.set()
        if signals["count"] > 1 and server._server is not None:  # the impatient second Ctrl-C
            asyncio.ensure_future(server._server.stop(None))

    server = Server(config)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    drained = True
    try:
        await server.start()
        warm = asyncio.ensure_future(server.warm())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({warm, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not warm.done():
            warm.cancel()
        else:
            warm.result()  # a server that cannot warm up cannot start
            if pending_hup:
                server.reload(pending_hup[0])
            await stopped
        drained = await server.drain()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info(
        "stopped%s",
        "" if drained else f" (calls still running after the {config.grace_period_s:g} s grace period were cancelled)",
    )
