"""`bitmoji-client`: classify images, probe gradients, show model info and health, manage the server's models.

Exit status: 0 on success; 1 when a call fails, the server is not SERVING, a
local file cannot be read, an image was refused (the others are still
classified) or a version failed to load; 2 for a wrong command line. Errors
are one line on stderr each, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitmoji.client import display, tensors
from bitmoji.client.channel import DEFAULT_TARGET
from bitmoji.client.client import BitmojiClient
from bitmoji.client.display import table  # noqa: F401 (the command's table, also for tests)
from bitmoji.client.errors import BitmojiError
from bitmoji.client.results import ModelStatus, Prediction

PROG = "bitmoji-client"
CLASSIFY_CHUNK = 64  # files per call: well under the server's per-call cap, and little memory for a long glob
DEFAULT_TIMEOUT = 10.0
LOAD_TIMEOUT = 120.0  # loading verifies and warms a model up: seconds, more on a busy server
BAD_INPUT = re.compile(r"^inputs\[(\d+)\]:\s*")  # how the server names a refused item


def target_value(label: str, class_names: Sequence[str], positive_class: str) -> float:
    """A class name (1.0 for the positive class, else 0.0) or a number such as 0 or 1."""
    if label in class_names:
        return 1.0 if label == positive_class else 0.0
    try:
        return float(label)
    except ValueError:
        choices = ", ".join(class_names) if class_names else "none: the model has no class names"
        raise ValueError(f"--label {label!r} is neither a class name ({choices}) nor a number") from None


def complain(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def refused_input(error: BitmojiError, count: int) -> tuple[int, str] | None:
    """(index, reason) when the server refused one of `count` items, naming it `inputs[i]: reason`."""
    match = BAD_INPUT.match(error.details)
    if error.code.name != "INVALID_ARGUMENT" or match is None or int(match.group(1)) >= count:
        return None
    return int(match.group(1)), error.details[match.end() :]


def classify_files(client: BitmojiClient, files: Sequence[str]) -> list[Prediction | str]:
    """A prediction or the server's reason for refusing it, per file. The server names the first bad item
    of a call (`inputs[i]`, i counted in that call); it is set aside and the rest of the call sent again."""
    answers: list[Prediction | str] = []
    for start in range(0, len(files), CLASSIFY_CHUNK):
        chunk: dict[int, Prediction | str] = {}
        pending = list(range(start, min(start + CLASSIFY_CHUNK, len(files))))
        while pending:
            try:
                predictions = client.classify([Path(files[i]) for i in pending])
            except BitmojiError as error:
                refused = refused_input(error, len(pending))
                if refused is None:
                    raise
                index, reason = refused
                chunk[pending.pop(index)] = reason
                continue
            chunk.update(zip(pending, predictions, strict=True))
            pending = []
        answers += [chunk[i] for i in sorted(chunk)]
    return answers


def run_classify(client: BitmojiClient, args: argparse.Namespace) -> int:
    answers = classify_files(client, args.images)
    good = [(f, a) for f, a in zip(args.images, answers, strict=True) if isinstance(a, Prediction)]
    bad = [(f, a) for f, a in zip(args.images, answers, strict=True) if isinstance(a, str)]
    if args.json:
        print(
            json.dumps(
                [
                    {"file": f, **vars(a)} if isinstance(a, Prediction) else {"file": f, "error": a}
                    for f, a in zip(args.images, answers, strict=True)
                ],
                indent=2,
            )
        )
    elif good:
        print(table(("file", "label", "probability", "logit"), [(f, p.label, p.probability, p.logit) for f, p in good]))
        print(display.answered_by((p.model_name, p.model_version, p.model_build) for _, p in good))
    for file, reason in bad:
        complain(f"{file}: {reason}")
    return 1 if bad else 0


def run_probe(client: BitmojiClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    target = target_value(args.label, info.class_names, info.positive_class)
    result = client.gradient_probe(
        [Path(args.image)], [target], args.loss, saliency=args.saliency is not None, tensor_type="list"
    )
    if args.saliency is not None:
        if result.saliency_pngs[0] is None:
            complain(f"the server sent no saliency map for {args.image}")
            return 1
        Path(args.saliency).write_bytes(result.saliency_pngs[0])
    outputs = tensors.flat(result.outputs)
    if args.json:
        print(
            json.dumps(
                {
                    "loss": result.loss,
                    "outputs": outputs,
                    "parameters": {
                        n: {"shape": list(g.shape), "norm": g.norm, "max_abs": g.max_abs, "mean_abs": g.mean_abs}
                        for n, g in result.parameters.items()
                    },
                    "saliency": args.saliency,
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                    "model_build": result.model_build,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"loss ({args.loss}, target {target:g}): {result.loss:.6f}   output: {', '.join(f'{v:.4f}' for v in outputs)}"
    )
    rows = [
        (n, "x".join(map(str, g.shape)) or "scalar", g.norm, g.max_abs, g.mean_abs)
        for n, g in result.parameters.items()
    ]
    # gradients span decades
    print(table(("parameter", "shape", "grad norm", "max abs", "mean abs"), rows, float_format=".3e"))
    if args.saliency is not None:
        print(f"saliency map written to {args.saliency}")
    print(display.answered_by([(result.model_name, result.model_version, result.model_build)]))
    return 0


def as_json(value: Any) -> str:
    return json.dumps(dataclasses.asdict(value), indent=2)


def run_info(client: BitmojiClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    print(as_json(info) if args.json else display.info_text(info))
    return 0


def run_health(client: BitmojiClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(json.dumps({"status": status}) if args.json else status)
    return 0 if status == "SERVING" else 1


def run_models(client: BitmojiClient, args: argparse.Namespace) -> int:
    models = client.list_models(ready_only=args.ready_only)
    print(as_json(models) if args.json else display.model_list_text(models))
    return 0


def show_status(model: ModelStatus, args: argparse.Namespace) -> None:
    print(as_json(model) if args.json else display.model_status_text(model))


def run_load(client: BitmojiClient, args: argparse.Namespace) -> int:
    model = client.load_model(args.model, args.versions or ())
    show_status(model, args)
    named = set(args.versions or [v.version for v in model.versions])
    failed = [v for v in model.versions if v.version in named and v.state == "FAILED"]
    for version in failed:
        complain(f"{args.model} version {version.version} failed to load: {version.reason or 'no reason given'}")
    return 1 if failed else 0


def run_unload(client: BitmojiClient, args: argparse.Namespace) -> int:
    show_status(client.unload_model(args.model, args.versions or ()), args)
    return 0


def run_promote(client: BitmojiClient, args: argparse.Namespace) -> int:
    show_status(client.set_default_version(args.model, args.version), args)
    return 0


def current_status(client: BitmojiClient, name: str) -> ModelStatus:
    try:
        return client.list_models()[name]
    except KeyError as error:
        raise ValueError(error.args[0]) from None


def run_rollback(client: BitmojiClient, args: argparse.Namespace) -> int:
    version = args.version
    if version is None:
        version = current_status(client, args.model).previous_default_version
        if not version:
            raise ValueError(
                f"{args.model} has no previous default version to roll back to; name one: rollback {args.model} VERSION"
            )
    show_status(client.set_default_version(args.model, version), args)
    return 0


def run_traffic(client: BitmojiClient, args: argparse.Namespace) -> int:
    """Without options: show the model's routing. Options change what they name and keep the rest
    (--clear first clears both the canary and the shadow)."""
    if args.weight is not None and not 0.0 <= args.weight <= 1.0:
        raise ValueError(f"--weight must be in [0, 1], got {args.weight:g}")
    if args.canary is not None and args.weight is None:
        raise ValueError("--canary needs --weight (the share of calls, 0 to 1)")
    current = current_status(client, args.model)
    if not (args.clear or args.canary is not None or args.weight is not None or args.shadow is not None):
        show_status(current, args)
        return 0
    canary, weight, shadow = (
        ("", 0.0, "") if args.clear else (current.canary_version, current.canary_weight, current.shadow_version)
    )
    if args.canary is not None:
        canary = args.canary
    if args.weight is not None:
        if not canary:
            raise ValueError(f"{args.model} has no canary to weigh: add --canary VERSION")
        weight = args.weight
    if args.shadow is not None:
        shadow = args.shadow
    show_status(client.set_traffic(args.model, canary, weight if canary else 0.0, shadow), args)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to a bitmoji classifier server over gRPC.",
        epilog="A bearer token for servers that want one is read from the environment variable BITMOJI_TOKEN; "
        "the management commands (models, load, unload, promote, rollback, traffic) send "
        "BITMOJI_MANAGEMENT_TOKEN instead when it is set.",
    )
    p.add_argument(
        "--target",
        default=os.environ.get("BITMOJI_TARGET", DEFAULT_TARGET),
        help="host:port, dns:///name:port, or ipv4:host:port,host:port (env BITMOJI_TARGET; default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help=f"each call's deadline in seconds, retries included (default {DEFAULT_TIMEOUT:g}; load {LOAD_TIMEOUT:g})",
    )
    p.add_argument("--model", help="the model to classify with, probe or describe (default: the server's default)")
    p.add_argument("--model-version", metavar="VERSION", help="its version (default: the model's default version)")
    p.add_argument("--tls", action="store_true", help="use TLS (system root certificates unless --ca-file)")
    p.add_argument("--ca-file", type=Path, help="PEM root certificates to trust (implies --tls)")
    p.add_argument("--cert", type=Path, help="PEM client certificate chain for mutual TLS (with --key; implies --tls)")
    p.add_argument("--key", type=Path, help="PEM private key of --cert")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("classify", help="classify image files and print a table")
    c.add_argument("images", nargs="+", metavar="IMG")
    c.set_defaults(run=run_classify)

    g = sub.add_parser("probe", help="gradients of the loss for one image; optionally save its saliency map")
    g.add_argument("image", metavar="IMG")
    g.add_argument("--label", required=True, help="the true class: a class name, or a number (1 = positive class)")
    g.add_argument("--loss", choices=("bce", "mse"), default="bce")
    g.add_argument("--saliency", metavar="OUT.png", help="write the server's saliency heat map here")
    g.set_defaults(run=run_probe)

    i = sub.add_parser("info", help="the model the server runs, how, and its versions")
    i.set_defaults(run=run_info)

    h = sub.add_parser("health", help="print the health status; exit 1 unless SERVING")
    h.add_argument("--service", default="", help='"" for the server (default) or bitmoji.v1.Classifier')
    h.set_defaults(run=run_health)

    m = sub.add_parser("models", help="every model and version the server knows: state, default, canary, shadow")
    m.add_argument("--ready-only", action="store_true", help="only models with a READY version")
    m.set_defaults(run=run_models)

    for name, run, what in (("load", run_load, "load"), ("unload", run_unload, "unload")):
        cmd = sub.add_parser(
            name,
            help=f"{what} a model's versions (none named: "
            + ("as its version policy says)" if name == "load" else "all of them)"),
        )
        cmd.add_argument("model", metavar="MODEL")
        cmd.add_argument("--version", dest="versions", action="append", metavar="V", help="a version; repeat for more")
        cmd.set_defaults(run=run)

    pr = sub.add_parser("promote", help="make VERSION the default: the calls that name no version get it")
    pr.add_argument("model", metavar="MODEL")
    pr.add_argument("version", metavar="VERSION")
    pr.set_defaults(run=run_promote)

    rb = sub.add_parser("rollback", help="make VERSION (default: the previous default) the default again")
    rb.add_argument("model", metavar="MODEL")
    rb.add_argument("version", metavar="VERSION", nargs="?")
    rb.set_defaults(run=run_rollback)

    t = sub.add_parser("traffic", help="show or set a model's canary (a share of calls) and shadow version")
    t.add_argument("model", metavar="MODEL")
    t.add_argument("--canary", metavar="V", help="the canary version (with --weight)")
    t.add_argument("--weight", type=float, metavar="W", help="the canary's share of the calls naming no version, 0..1")
    t.add_argument("--shadow", metavar="V", help="the shadow version: runs the same calls off their path")
    t.add_argument("--clear", action="store_true", help="remove the canary and the shadow (before the other options)")
    t.set_defaults(run=run_traffic)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        root_certificates = args.ca_file.read_bytes() if args.ca_file else None
        if (args.cert is None) != (args.key is None):
            raise ValueError("--cert and --key go together")
        certificate_chain = args.cert.read_bytes() if args.cert else None
        private_key = args.key.read_bytes() if args.key else None
        timeout = (
            args.timeout if args.timeout is not None else LOAD_TIMEOUT if args.command == "load" else DEFAULT_TIMEOUT
        )
        with BitmojiClient(
            args.target,
            timeout=timeout,
            tls=args.tls or certificate_chain is not None,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=os.environ.get("BITMOJI_TOKEN") or None,
            management_token=os.environ.get("BITMOJI_MANAGEMENT_TOKEN") or None,
            model=args.model,
            version=args.model_version,
        ) as client:
            code: int = args.run(client, args)
            return code
    except BitmojiError as error:
        request = f", request id {error.request_id}" if error.request_id else ""
        complain(f"{args.command} failed: {error.code.name}: {error.details} (target {args.target}{request})")
    except BrokenPipeError:  # the reader went away (`| head`): nothing to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as error:
        complain(f"{error.filename or ''}{': ' if error.filename else ''}{error.strerror or error}")
    except (ValueError, TypeError) as error:
        complain(str(error))
    except KeyboardInterrupt:
        return 130
    return 1
