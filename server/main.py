"""One server process's life: load, warm up, serve until SIGTERM/SIGINT, drain (`serve`).

Life cycle: the gRPC port opens first with health NOT_SERVING (so probes get
an answer during warm-up); the model is warmed up at the batch sizes it will
meet; health turns SERVING and one "ready on HOST:PORT" line is logged. On
SIGTERM or SIGINT health turns NOT_SERVING, new calls are refused, accepted
calls get up to --grace-period-s to finish, then long-lived streams (health
Watch) are closed, and one "stopped" line is logged. A second signal stops at
once. SIGHUP reloads the model file (see `bitmoji.server.reload`); TLS and tokens are
`bitmoji.server.security`'s. The `bitmoji-serve` command itself is `bitmoji.server.cli`.
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
from bitmoji.core.modelfile import ModelFileError, load_model
from bitmoji.server.batcher import Batcher
from bitmoji.server.config import ServerConfig, address, cpu_count
from bitmoji.server.inputs import decode_input
from bitmoji.server.metrics import Metrics
from bitmoji.server.model import ServedModel, error_summary
from bitmoji.server.reload import ModelReloader
from bitmoji.server.security import TokenAuthInterceptor, describe, server_credentials, tokens
from bitmoji.server.serialization import add_timed
from bitmoji.server.service import SERVICE_NAME, ClassifierService
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("bitmoji-serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WATCH_FLUSH_S = 0.2
GOAWAY_FLUSH_S = 0.05


def default_torch_threads(device: torch.device, cores: int | None = None) -> int:
    """Half the cores on CPU (the rest decode and run gRPC), one with CUDA.

    The forward pass shares the machine with the other model threads' decoding
    and the event loop; OpenMP threads that outnumber the free cores spin and
    stall each other (measured on a busy 2-core box: the CNN at batch 1 took 6 ms with
    one thread, 325 ms with two).
    """
    return max(1, (cores or cpu_count()) // 2) if device.type == "cpu" else 1


async def serve(config: ServerConfig) -> None:
    """Run the server until a signal; raises ModelFileError (or RuntimeError) when it cannot start."""
    loop = asyncio.get_running_loop()
    # SIGHUP's default action ends the process: catch it from the start (a reload asked for before
    # the server is ready runs once it is).
    reloader: ModelReloader | None = None
    early_hup: list[bool] = []

    def on_hup() -> None:
        if reloader is None:
            early_hup.append(True)
        else:
            reloader.request("SIGHUP")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # Certificates and tokens first: a misconfigured server fails before the (slow) model load.
    credentials = server_credentials(config)
    auth_token, probe_token = tokens(config)
    if auth_token and credentials is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "a bearer token without TLS on %s: tokens cross the network in clear text (add --tls-cert/--tls-key)",
            config.host,
        )
    device = resolve_device(config.device)
    threads = config.torch_threads or default_torch_threads(device, cores=config.resolved_cores)
    torch.set_num_threads(threads)
    # torch keeps MKL's thread count per thread, and a new thread's GEMMs use every core: every thread that
    # runs the model (loading, --optimize's timing, warm-up, reload, probes, the model threads) starts with this.
    loop.set_default_executor(
        ThreadPoolExecutor(thread_name_prefix="bitmoji", initializer=torch.set_num_threads, initargs=(threads,))
    )
    loaded = await asyncio.to_thread(load_model, config.model, device)
    model = ServedModel.create(loaded, max_pixels=config.max_image_pixels, input_shape=config.input_shape)

    metrics = Metrics()
    metrics.torch_threads.set(threads)
    metrics.set_model(model.version, str(device), loaded.metadata.get("architecture", "") or "")
    batcher = Batcher(
        model,
        decode=decode_input,
        max_batch_size=config.max_batch_size,
        max_delay_s=config.max_batch_delay_s,
        max_queue=config.max_queue,
        metrics=metrics,
        threads=config.resolved_decode_workers,
        torch_threads=threads,
    )
    # A probe's forward and backward are memory-bound passes over the weights and their gradients: its one thread
    # gets all of this process's cores (the setting is per thread; the model threads keep theirs).
    probe_threads = max(threads, config.resolved_decode_workers) if device.type == "cpu" else threads
    probe_pool = ThreadPoolExecutor(
        1, thread_name_prefix="bitmoji-probe", initializer=torch.set_num_threads, initargs=(probe_threads,)
    )
    service = ClassifierService(config, batcher, metrics, probe_pool=probe_pool, torch_threads=threads)
    reloader = ModelReloader(config, service, metrics)
    if early_hup:
        reloader.request("SIGHUP")

    interceptors = [TokenAuthInterceptor(auth_token, probe_token, metrics)] if auth_token or probe_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    add_timed(pb_grpc.add_ClassifierServicer_to_server, service, server, metrics.serialization_duration)
    health_servicer = health.aio.HealthServicer()
    # The Open Inference Protocol (KServe V2) beside it. Imported here, not at the top: tritonclient ships the
    # same `inference.*` protobuf messages, and a process that imports bitmoji.server.main (a test) may load tritonclient.
    from bitmoji.server import kserve

    services = (
        SERVICE_NAME,
        kserve.add_to_server(
            server, service, health_servicer, model_name=config.model_name, serialization=metrics.serialization_duration
        ),
    )
    for name in ("", *services):
        await health_servicer.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    httpd = metrics.serve(config.metrics_host, config.metrics_port) if config.metrics_port else None
    listen = address(config.host, config.port)
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    await server.start()

    stop = asyncio.Event()
    signals = {"count": 0}

    def on_signal() -> None:
        signals["count"] += 1
        stop.set()
        if signals["count"] > 1:  # the impatient second Ctrl-C
            asyncio.ensure_future(server.stop(None))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        warm = asyncio.ensure_future(_warm_up(model, config))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({warm, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not warm.done():
            warm.cancel()
        else:
            model, sizes, forward = warm.result()  # a model that fails warm-up fails start-up
            service.swap_model(model)  # before the model threads start: every batch runs the chosen module
            log.info("Classify's forward pass: %s", forward)
            batcher.start()
            for name in ("", *services):
                await health_servicer.set(name, SERVING)
            reloader.start()
            metrics_url = f"http://{address(config.metrics_host, config.metrics_port)}/metrics" if httpd else "off"
            reload_mode = (
                f"SIGHUP or file change (every {config.reload_poll_s:g} s)" if config.reload_poll_s else "SIGHUP"
            )
            log.info(
                "ready on %s (model %s, device %s, torch threads %d, warmed batch sizes %s, metrics %s, %s, reload on %s)",
                address(config.host, port),
                model.version,
                device,
                threads,
                sizes or "none",
                metrics_url,
                describe(config, auth_token, probe_token),
                reload_mode,
            )
            await stopped
    finally:
        await reloader.stop()  # no model swap during the drain
        # Refuses new calls from now on. The grace period is the drain's to enforce (below); gRPC's own
        # timer gets a second more, or the two race and a cut call could be reported as drained.
        stopping = asyncio.ensure_future(server.stop(config.grace_period_s + 1.0))
        # Health goes NOT_SERVING only once the shutdown's GOAWAY has had a moment to reach the clients: one that
        # sees NOT_SERVING and sends a last call must find the door shut (UNAVAILABLE, safe to retry elsewhere),
        # not race the GOAWAY onto the closing connection (where gRPC may answer CANCELLED: 1 run in ~16 on a busy box).
        await asyncio.sleep(GOAWAY_FLUSH_S)
        await health_servicer.enter_graceful_shutdown()
        log.info(
            "stopping: health NOT_SERVING, new calls refused, draining %d accepted calls (grace period %g s)",
            service.active,
            config.grace_period_s,
        )
        drained = await service.drain(config.grace_period_s)
        # Watch streams learn NOT_SERVING on their next loop turn; a moment lets that reach the wire
        # before the cancel below, or a load balancer watching health only sees the connection drop.
        await asyncio.sleep(WATCH_FLUSH_S)
        await server.stop(None)  # what is left: health Watch streams, or calls past the grace period
        await stopping
        batcher.close(timeout=config.grace_period_s)
        probe_pool.shutdown(wait=False, cancel_futures=True)
        if httpd is not None:
            await asyncio.to_thread(httpd.shutdown)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info(
            "stopped%s",
            ""
            if drained
            else f" (calls still running after the {config.grace_period_s:g} s grace period were cancelled)",
        )


async def _warm_up(model: ServedModel, config: ServerConfig) -> tuple[ServedModel, list[int], str]:
    """Off the loop: pick Classify's forward module (`--optimize`), then warm it; -> (model, batch sizes, which module)."""
    try:
        model, forward = await asyncio.to_thread(model.optimized, config.max_batch_size, config.optimize)
        sizes = await asyncio.to_thread(model.warmup, config.max_batch_size)
    except Exception as exc:  # the model cannot serve what its file (or --input-shape) says it takes
        raise ModelFileError(f"{config.model}: warm-up failed: {error_summary(exc)}") from None
    if config.warmup_delay_s:
        await asyncio.sleep(config.warmup_delay_s)
    return model, sizes, forward
