"""Every server knob in one typed place, from flags or `BITMOJI_<FLAG_NAME>` environment variables.

A flag on the command line wins over its environment variable, which wins
over the default; `--max-batch-size 8` and `BITMOJI_MAX_BATCH_SIZE=8` are the
same thing. Containers set environment variables, people type flags.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from bitmoji.core.limits import DEFAULT_MAX_PIXELS

OPTIMIZE_MODES = ("auto", "on", "off")

ENV_PREFIX = "BITMOJI_"


def address(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServerConfig:
    model: str
    model_name: str = "bitmoji"  # the model's name in the Open Inference Protocol (KServe V2) service
    device: str = "auto"  # auto | cpu | cuda (auto picks cuda when available)
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (the ready line says which)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0 = no metrics endpoint
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    max_queue: int = 1024  # items accepted and not yet in a model batch
    max_items_per_call: int = 256
    max_probe_inputs: int = 8
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message limit, both directions
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked on the header
    workers: int = 1  # server processes sharing the port (see bitmoji.server.workers)
    cores: int | None = (
        None  # cores the thread defaults are sized to; None = the CPU affinity mask (see resolved_cores)
    )
    decode_workers: int | None = None  # model threads (decode + forward); None = one per core
    torch_threads: int | None = None  # None = half the cores on CPU, 1 with CUDA (see main.default_torch_threads)
    optimize: str = "auto"  # Classify's forward on a frozen, optimized copy: auto (when faster) | on | off (see ServedModel.optimized)
    input_shape: tuple[int, ...] | None = None  # item shape for models whose file declares none
    gradient_probe: bool = True
    grace_period_s: float = 10.0
    reload_poll_s: float = 0.0  # 0 = reload the model on SIGHUP only; > 0 = also when the file changes
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, gRPC is served over TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    # Secrets stay out of repr(): a logged config must not leak them.
    auth_token: str | None = field(default=None, repr=False)  # Bearer token every call needs (health excepted)
    auth_token_file: str | None = None  # the same, read from a file (keeps it out of `ps` and the environment)
    probe_token: str | None = field(default=None, repr=False)  # GradientProbe's own token
    probe_token_file: str | None = None
    log_level: str = "INFO"
    warmup_delay_s: float = 0.0  # test-only: stay NOT_SERVING this much longer

    def __post_init__(self):
        positive = (
            "workers",
            "max_batch_size",
            "max_queue",
            "max_items_per_call",
            "max_probe_inputs",
            "max_message_bytes",
            "max_image_pixels",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("cores", "decode_workers", "torch_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.optimize not in OPTIMIZE_MODES:
            raise ValueError(f"--optimize must be one of {', '.join(OPTIMIZE_MODES)} (got {self.optimize!r})")
        for name in ("max_batch_delay_ms", "grace_period_s", "warmup_delay_s", "reload_poll_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative (got {getattr(self, name)})")
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("ports must lie in 0..65535")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        # A call must be able to fit in the queue at all: otherwise it would get
        # RESOURCE_EXHAUSTED forever, which a client would retry forever.
        if self.max_queue < self.max_items_per_call:
            raise ValueError(
                f"--max-queue ({self.max_queue}) must be at least --max-items-per-call ({self.max_items_per_call})"
            )
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"--log-level must be DEBUG, INFO, WARNING or ERROR (got {self.log_level!r})")
        if not self.model_name or not self.model_name.isprintable() or any(c.isspace() for c in self.model_name):
            raise ValueError(f"--model-name must be a non-empty name without spaces (got {self.model_name!r})")
        if self.input_shape is not None and (not self.input_shape or min(self.input_shape) < 1):
            raise ValueError(f"--input-shape needs positive dimensions (got {self.input_shape})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("auth_token", "probe_token"):
            if getattr(self, name) is not None and getattr(self, name + "_file") is not None:
                raise ValueError(f"give --{name.replace('_', '-')} or --{name.replace('_', '-')}-file, not both")
            if getattr(self, name) is not None:
                check_token(getattr(self, name), f"--{name.replace('_', '-')}")

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0

    @property
    def resolved_cores(self) -> int:
        return self.cores or cpu_count()

    @property
    def resolved_decode_workers(self) -> int:
        return self.decode_workers or self.resolved_cores


def check_token(token: str, what: str) -> str:
    """A bearer token must be sendable as gRPC metadata: printable ASCII, no spaces; and not empty."""
    if not token:
        raise ValueError(f"{what} is empty")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"{what} must be printable ASCII without spaces")  # never echo the token itself
    return token


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape like 3,128,128: {text!r}") from None


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def build_parser(environ=os.environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmoji-serve",
        description="Serve a bitmoji TorchScript model over gRPC (Classify, StreamClassify, GradientProbe, GetModelInfo, "
        "and the Open Inference Protocol, KServe V2), with health, reflection and Prometheus metrics.",
        epilog=f"Every flag can also be set by an environment variable: {ENV_PREFIX}<FLAG_NAME>, "
        f"e.g. {ENV_PREFIX}MAX_BATCH_SIZE=64. Flags win over the environment.",
    )
    d = ServerConfig.__dataclass_fields__

    def flag(name: str, type_, help_: str, *, default=None, hidden: bool = False, **kwargs):
        dest = name.replace("-", "_")
        env = ENV_PREFIX + dest.upper()
        if default is None and dest in d:
            default = d[dest].default
        # argparse runs `type` on string defaults, so a bad environment value is
        # reported like a bad flag.
        value = environ.get(env, default)
        parser.add_argument(
            f"--{name}",
            type=type_,
            default=value,
            dest=dest,
            help=argparse.SUPPRESS if hidden else f"{help_} [env {env}; default {default}]",
            **kwargs,
        )

    parser.add_argument(
        "--model",
        default=environ.get(ENV_PREFIX + "MODEL"),
        required=ENV_PREFIX + "MODEL" not in environ,
        help=f"the TorchScript model file to serve (a TorchScript file is code: serve only files you trust) [env {ENV_PREFIX}MODEL]",
    )
    flag("model-name", str, "the model's name in the Open Inference Protocol (KServe V2) service")
    flag("device", str, "auto, cpu, cuda or cuda:N; auto picks cuda when available")
    flag("host", str, "address for gRPC")
    flag("port", int, "port for gRPC; 0 picks a free one")
    flag("metrics-host", str, "address for the Prometheus endpoint")
    flag("metrics-port", int, "port for the Prometheus endpoint /metrics; 0 disables it")
    flag("max-batch-size", int, "most items in one model batch")
    flag("max-batch-delay-ms", float, "longest a batch waits for more items, from its first item's arrival")
    flag("max-queue", int, "most items accepted but not yet in a batch; beyond it calls get RESOURCE_EXHAUSTED")
    flag("max-items-per-call", int, "most inputs in one Classify request")
    flag("max-probe-inputs", int, "most inputs in one GradientProbe request")
    flag("max-message-bytes", int, "largest gRPC message, received or sent")
    flag("max-image-pixels", int, "largest image (width x height) to decode; checked before decoding")
    flag(
        "workers",
        int,
        "server processes sharing the gRPC port (SO_REUSEPORT), metrics summed on one endpoint; "
        "each gets its share of the cores",
    )
    flag(
        "cores",
        int,
        "cores to size the thread defaults to, e.g. a container's CPU limit (default: the CPU affinity mask)",
    )
    flag(
        "decode-workers",
        int,
        "model threads: each decodes a batch of queued items and runs its forward pass (default: one per core)",
    )
    flag("torch-threads", int, "torch intra-op threads (default: half the cores on CPU, 1 with CUDA)")
    flag(
        "optimize",
        str,
        "auto, on or off: run Classify on a frozen copy passed through torch.jit.optimize_for_inference "
        "(checked to give the same logits); auto times both at start-up and keeps the faster (CPU only)",
        choices=OPTIMIZE_MODES,
    )
    flag(
        "input-shape",
        _shape,
        "item shape, e.g. 1 or 3,128,128, for models whose file declares none (warm-up, validation)",
    )
    flag(
        "disable-gradient-probe",
        _bool,
        "answer GradientProbe with UNIMPLEMENTED (it reveals the model's internals)",
        default=False,
        nargs="?",
        const=True,
    )
    flag("grace-period-s", float, "on SIGTERM/SIGINT, how long accepted calls may take to finish")
    flag("reload-poll-s", float, "also reload the model when its file changes, checked this often (0: SIGHUP only)")
    flag("tls-cert", str, "PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    flag("tls-key", str, "PEM private key of --tls-cert")
    flag("tls-client-ca", str, "PEM CA bundle: require client certificates it signed (mutual TLS)")
    flag("auth-token", str, "bearer token every call needs, health excepted (prefer --auth-token-file)")
    flag("auth-token-file", str, "file holding the bearer token")
    flag("probe-token", str, "bearer token GradientProbe needs (prefer --probe-token-file)")
    flag("probe-token-file", str, "file holding GradientProbe's token")
    flag("log-level", str.upper, "DEBUG, INFO, WARNING or ERROR")
    flag("warmup-delay-s", float, "test-only: stay NOT_SERVING this much longer after warm-up", hidden=True)
    return parser


def parse_config(argv: list[str] | None = None, environ=os.environ) -> ServerConfig:
    """Flags and environment -> a validated ServerConfig (exits with usage on errors, like argparse)."""
    parser = build_parser(environ)
    args = vars(parser.parse_args(argv))
    args["gradient_probe"] = not args.pop("disable_gradient_probe")
    for name in (
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "auth_token",
        "auth_token_file",
        "probe_token",
        "probe_token_file",
    ):
        args[name] = args[name] or None  # an empty environment variable means unset
    try:
        return ServerConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
