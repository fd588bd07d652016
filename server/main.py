"""`bitmoji-serve`: load, warm up, serve until SIGTERM/SIGINT, drain, exit 0.

Life cycle: the gRPC port opens first with health NOT_SERVING (so probes get
an answer during warm-up); the model is warmed up at the batch sizes it will
meet; health turns SERVING and one "ready on HOST:PORT" line is logged. On
SIGTERM or SIGINT health turns NOT_SERVING, new calls are refused, accepted
calls get up to --grace-period-s to finish, then long-lived streams (health
Watch) are closed, and one "stopped" line is logged. A second signal stops at
once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bitmoji.v1 import classifier_pb2_grpc as pb_grpc
from server.batcher import Batcher
from server.config import ServerConfig, cpu_count, parse_config
from server.metrics import Metrics
from server.model import ServedModel, error_summary, resolve_device
from server.service import SERVICE_NAME, ClassifierService
from trainer.modelfile import ModelFileError, load_model

log = logging.getLogger("bitmoji-serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def default_torch_threads(device: torch.device) -> int:
    """Half the cores on CPU (the rest decode and run gRPC), one with CUDA.

    The forward pass shares the machine with the decode pool and the event
    loop; OpenMP threads that outnumber the free cores spin and stall each
    other (measured on a busy 2-core box: the CNN at batch 1 took 6 ms with
    one thread, 325 ms with two).
    """
    return max(1, cpu_count() // 2) if device.type == "cpu" else 1


async def serve(config: ServerConfig) -> None:
    """Run the server until a signal; raises ModelFileError (or RuntimeError) when it cannot start."""
    loop = asyncio.get_running_loop()
    device = resolve_device(config.device)
    threads = config.torch_threads or default_torch_threads(device)
    torch.set_num_threads(threads)
    loaded = await asyncio.to_thread(load_model, config.model, device)
    model = ServedModel.create(loaded, max_pixels=config.max_image_pixels, input_shape=config.input_shape)

    metrics = Metrics()
    metrics.torch_threads.set(threads)
    metrics.set_model(model.version, str(device), loaded.metadata.get("architecture", "") or "")
    batcher = Batcher(
        model, max_batch_size=config.max_batch_size, max_delay_s=config.max_batch_delay_s,
        max_queue=config.max_queue, metrics=metrics,
    )
    decode_pool = ThreadPoolExecutor(config.resolved_decode_workers, thread_name_prefix="bitmoji-decode")
    probe_pool = ThreadPoolExecutor(1, thread_name_prefix="bitmoji-probe")
    service = ClassifierService(config, batcher, metrics, decode_pool=decode_pool, probe_pool=probe_pool, torch_threads=threads)

    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ])
    pb_grpc.add_ClassifierServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    httpd = metrics.serve(config.metrics_host, config.metrics_port) if config.metrics_port else None
    # TLS (issue 5) becomes add_secure_port here; token checks an interceptor on grpc.aio.server.
    port = server.add_insecure_port(_address(config.host, config.port))
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
            sizes = warm.result()  # a model that fails warm-up fails start-up
            batcher.start()
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, SERVING)
            metrics_url = f"http://{_address(config.metrics_host, config.metrics_port)}/metrics" if httpd else "off"
            log.info(
                "ready on %s (model %s, device %s, torch threads %d, warmed batch sizes %s, metrics %s)",
                _address(config.host, port), model.version, device, threads, sizes or "none", metrics_url,
            )
            await stopped
    finally:
        await health_servicer.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(server.stop(config.grace_period_s))  # refuses new calls from now on
        drained = await service.drain(config.grace_period_s)
        await server.stop(None)  # what is left: health Watch streams, or calls past the grace period
        await stopping
        batcher.close(timeout=config.grace_period_s)
        decode_pool.shutdown(wait=False, cancel_futures=True)
        probe_pool.shutdown(wait=False, cancel_futures=True)
        if httpd is not None:
            await asyncio.to_thread(httpd.shutdown)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped%s", "" if drained else f" (calls still running after the {config.grace_period_s:g} s grace period were cancelled)")


async def _warm_up(model: ServedModel, config: ServerConfig) -> list[int]:
    try:
        sizes = await asyncio.to_thread(model.warmup, config.max_batch_size)
    except Exception as exc:  # the model cannot serve what its file (or --input-shape) says it takes
        raise ModelFileError(f"{config.model}: warm-up failed: {error_summary(exc)}") from None
    if config.warmup_delay_s:
        await asyncio.sleep(config.warmup_delay_s)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """The console entry: serve until a signal, then end the process (0 = clean stop, 1 = could not start).

    It ends the process with os._exit once everything is flushed: torch's
    interpreter teardown takes seconds and has nothing left to clean up, and
    a rolling restart should not wait for it. Embed `serve()` instead.
    """
    config = parse_config(argv)
    configure_logging(config.log_level)
    code = 0
    try:
        asyncio.run(serve(config))
    except (ModelFileError, RuntimeError, OSError) as exc:
        log.error("%s", exc)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
