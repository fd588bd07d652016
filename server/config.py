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
from bitmoji.server.repository import NAME  # torch-free: the `--workers` supervisor parses these flags too

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


CONTROL_MODES = ("none", "poll", "explicit")
LOG_FORMATS = ("text", "json")
TOKEN_NAMES = ("auth_token", "probe_token", "management_token")


@dataclass(frozen=True)
class ServerConfig:
    # What to serve: one model file, or a model repository (DIR/<name>/<version>/model.pt: see server.repository).
    model: str | None = None  # served as model `model_name`, version 1
    model_repository: str | None = None
    model_name: str = "bitmoji"  # the --model file's name (in every protocol)
    default_model: str | None = None  # what calls naming no model get; None: the repository's only model
    model_control_mode: str = "none"  # none | poll | explicit, as Triton's (see server.models)
    load_model: tuple[str, ...] = ()  # explicit mode: the models to load at start ("*": all)
    repository_poll_s: float = 5.0  # poll mode: how often the repository is rescanned
    max_loaded_models: int = 0  # model versions loaded at once at most (0: no limit)
    device: str = "auto"  # auto | cpu | cuda (auto picks cuda when available)
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (the ready line says which)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0 = no metrics endpoint
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    max_queue: int = 1024  # items accepted and not yet in a model batch, per model version
    max_items_per_call: int = 256
    max_probe_inputs: int = 8
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message limit, both directions
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked on the header
    # Overload (see server.interceptor): calls past --max-concurrent-rpcs get RESOURCE_EXHAUSTED before they are
    # read; grpc core holds at most --max-pending-rpcs calls the server has not picked up yet, and cancels calls
    # past it at random, so it must stay well above what admission refuses in a burst.
    max_concurrent_rpcs: int = 2048
    max_pending_rpcs: int = 10000
    workers: int = 1  # server processes sharing the port (see server.workers)
    worker_restart_limit: int = 5  # a worker that dies more often than this in the window stops the supervisor
    worker_restart_window_s: float = 60.0
    cores: int | None = None  # cores the thread defaults are sized to; None: the CPU affinity mask
    decode_workers: int | None = None  # model threads per model version (decode + forward); None: one per core
    torch_threads: int | None = None  # None: half the cores on CPU, 1 with CUDA (see server.server)
    optimize: str = "auto"  # Classify on a frozen, optimized copy: auto (when faster) | on | off
    input_shape: tuple[int, ...] | None = None  # item shape for models whose file declares none
    gradient_probe: bool = True
    open_inference_protocol: bool = True  # serve inference.GRPCInferenceService (KServe V2) beside bitmoji.v1
    shutdown_delay_s: float = 0.0  # on SIGTERM: keep serving this long while health says NOT_SERVING
    grace_period_s: float = 10.0  # then: how long accepted calls may take to finish
    reload_poll_s: float = 0.0  # --model: 0 = reload on SIGHUP only; > 0 = also when the file changes
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, gRPC is served over TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    # Secrets stay out of repr(): a logged config must not leak them.
    auth_token: str | None = field(default=None, repr=False)  # Bearer token every call needs (health excepted)
    auth_token_file: str | None = None  # the same, read from a file (keeps it out of `ps` and the environment)
    probe_token: str | None = field(default=None, repr=False)  # GradientProbe's own token
    probe_token_file: str | None = None
    management_token: str | None = field(default=None, repr=False)  # loading, unloading, routing models
    management_token_file: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one object a line)
    warmup_delay_s: float = 0.0  # test-only: stay NOT_SERVING this much longer
    supervised: bool = False  # set by the --workers supervisor on its workers (management calls are refused)

    def __post_init__(self):
        if (self.model is None) == (self.model_repository is None):
            raise ValueError("give --model FILE or --model-repository DIR (one of them)")
        positive = (
            "workers",
            "max_batch_size",
            "max_queue",
            "max_items_per_call",
            "max_probe_inputs",
            "max_message_bytes",
            "max_image_pixels",
            "max_concurrent_rpcs",
            "max_pending_rpcs",
            "worker_restart_limit",
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
        nonnegative = (
            "max_batch_delay_ms",
            "grace_period_s",
            "shutdown_delay_s",
            "warmup_delay_s",
            "reload_poll_s",
            "max_loaded_models",
        )
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative (got {getattr(self, name)})")
        if self.worker_restart_window_s <= 0:
            raise ValueError(f"--worker-restart-window-s must be positive (got {self.worker_restart_window_s})")
        if self.repository_poll_s <= 0:
            raise ValueError(f"--repository-poll-s must be positive (got {self.repository_poll_s})")
        if self.model_control_mode not in CONTROL_MODES:
            raise ValueError(
                f"--model-control-mode must be one of {', '.join(CONTROL_MODES)} (got {self.model_control_mode!r})"
            )
        if self.model and self.model_control_mode != "none":
            raise ValueError("--model-control-mode poll or explicit needs --model-repository (--model serves one file)")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError("--load-model is for --model-control-mode explicit (the other modes load every model)")
        if self.model and self.default_model not in (None, self.model_name):
            raise ValueError("--default-model is for --model-repository (--model serves --model-name)")
        if self.max_pending_rpcs < self.max_concurrent_rpcs:
            raise ValueError(
                f"--max-pending-rpcs ({self.max_pending_rpcs}) must be at least --max-concurrent-rpcs "
                f"({self.max_concurrent_rpcs}): past it grpc cancels calls instead of our RESOURCE_EXHAUSTED"
            )
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
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be text or json (got {self.log_format!r})")
        for name in ("model_name", "default_model"):
            value = getattr(self, name)
            if value is not None and not NAME.match(value):
                raise ValueError(
                    f"--{name.replace('_', '-')} {value!r} is not a model name: letters, digits, '.', '_' and '-'"
                )
        if self.input_shape is not None and (not self.input_shape or min(self.input_shape) < 1):
            raise ValueError(f"--input-shape needs positive dimensions (got {self.input_shape})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in TOKEN_NAMES:
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


class _ExtendNames(argparse.Action):
    """A repeatable flag whose values add up; its default (from the environment) is replaced, not extended."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(
            namespace,
            self.dest,
            (current if isinstance(current, list) and current is not self.default else []) + values,
        )


def _names(text: str) -> list[str]:
    """`a,b` -> ["a", "b"] (the environment gives one string; the flag may also be repeated)."""
    return [name.strip() for name in str(text).split(",") if name.strip()]


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
        description="Serve bitmoji TorchScript models over gRPC (Classify, StreamClassify, GradientProbe, "
        "GetModelInfo, ModelRepository, "
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

    what = parser.add_argument_group("what to serve (one of --model and --model-repository)")
    what.add_argument(
        "--model",
        default=environ.get(ENV_PREFIX + "MODEL") or None,
        help=f"a TorchScript model file, served as --model-name version 1 (a TorchScript file is code: serve only "
        f"files you trust) [env {ENV_PREFIX}MODEL]",
    )
    flag(
        "model-repository",
        str,
        "a model repository: DIR/<name>/<version>/model.pt, with an optional DIR/<name>/config.json",
    )
    flag("model-name", str, "the --model file's model name, in every protocol")
    flag("default-model", str, "the repository model calls that name none get (default: the only model, if one)")
    flag(
        "model-control-mode",
        str,
        "none: load what the repository's version policies select at start; poll: also rescan every "
        "--repository-poll-s; explicit: load only --load-model and what management calls load",
        choices=CONTROL_MODES,
    )
    flag(
        "load-model",
        _names,
        "explicit mode: models to load at start, comma-separated or repeated ('*': all)",
        default="",
        action=_ExtendNames,
    )
    flag("repository-poll-s", float, "poll mode: seconds between repository scans")
    flag("max-loaded-models", int, "model versions loaded at once at most; a load past it is refused (0: no limit)")
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
        "max-concurrent-rpcs",
        int,
        "calls handled at once at most; past it, RESOURCE_EXHAUSTED before the request is read",
    )
    flag(
        "max-pending-rpcs",
        int,
        "calls grpc may hold before the server picks them up (past it grpc cancels calls at random; keep it above "
        "--max-concurrent-rpcs)",
    )
    flag(
        "workers",
        int,
        "server processes sharing the gRPC port (SO_REUSEPORT), metrics summed on one endpoint; "
        "each gets its share of the cores",
    )
    flag(
        "worker-restart-limit",
        int,
        "--workers: a worker that dies more often than this within --worker-restart-window-s stops the server "
        "(exit 1) instead of being restarted again",
    )
    flag("worker-restart-window-s", float, "--workers: the window --worker-restart-limit counts deaths in")
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
    flag(
        "shutdown-delay-s",
        float,
        "on SIGTERM/SIGINT, keep serving this long with health NOT_SERVING (so load balancers move away first), "
        "then refuse new calls with UNAVAILABLE",
    )
    flag(
        "disable-open-inference-protocol",
        _bool,
        "do not serve the Open Inference Protocol (KServe V2, inference.GRPCInferenceService) beside bitmoji.v1",
        default=False,
        nargs="?",
        const=True,
    )
    flag("grace-period-s", float, "then, how long accepted calls may take to finish")
    flag("reload-poll-s", float, "also reload the model when its file changes, checked this often (0: SIGHUP only)")
    flag("tls-cert", str, "PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    flag("tls-key", str, "PEM private key of --tls-cert")
    flag("tls-client-ca", str, "PEM CA bundle: require client certificates it signed (mutual TLS)")
    flag("auth-token", str, "bearer token every call needs, health excepted (prefer --auth-token-file)")
    flag("auth-token-file", str, "file holding the bearer token")
    flag("probe-token", str, "bearer token GradientProbe needs (prefer --probe-token-file)")
    flag("probe-token-file", str, "file holding GradientProbe's token")
    flag(
        "management-token",
        str,
        "bearer token the calls that load, unload and route models need (prefer --management-token-file)",
    )
    flag("management-token-file", str, "file holding the management token")
    flag("log-level", str.upper, "DEBUG, INFO, WARNING or ERROR")
    flag("log-format", str, "text (for people) or json (one object a line, for log pipelines)", choices=LOG_FORMATS)
    flag("warmup-delay-s", float, "test-only: stay NOT_SERVING this much longer after warm-up", hidden=True)
    flag("supervised", _bool, "set by the --workers supervisor on its workers", hidden=True, nargs="?", const=True)
    return parser


def parse_config(argv: list[str] | None = None, environ=os.environ) -> ServerConfig:
    """Flags and environment -> a validated ServerConfig (exits with usage on errors, like argparse)."""
    parser = build_parser(environ)
    args = vars(parser.parse_args(argv))
    args["gradient_probe"] = not args.pop("disable_gradient_probe")
    args["open_inference_protocol"] = not args.pop("disable_open_inference_protocol")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "model", "model_repository", "default_model", *TOKEN_NAMES):
        args[name] = args[name] or None  # an empty environment variable means unset
    for name in TOKEN_NAMES:
        args[name + "_file"] = args[name + "_file"] or None
    args["load_model"] = tuple(args["load_model"] or ())
    try:
        return ServerConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
