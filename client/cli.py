"""`bitmoji-client`: classify images, probe gradients, show model info and health from a shell.

Exit status: 0 on success; 1 when a call fails, the server is not SERVING, or a
local file cannot be read; 2 for a wrong command line. Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bitmoji.client.channel import DEFAULT_TARGET
from bitmoji.client.client import BitmojiClient
from bitmoji.client.errors import BitmojiError

PROG = "bitmoji-client"
CLASSIFY_CHUNK = 64  # files per call: well under the server's per-call cap, and little memory for a long glob


def table(header: Sequence[str], rows: Sequence[Sequence[object]], float_format: str = ".4f") -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [list(header)] + [
        [format(c, float_format) if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    lines = []
    for row in cells:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def target_value(label: str, class_names: Sequence[str], positive_class: str) -> float:
    """A class name (1.0 for the positive class, else 0.0) or a number such as 0 or 1."""
    if label in class_names:
        return 1.0 if label == positive_class else 0.0
    try:
        return float(label)
    except ValueError:
        choices = ", ".join(class_names) if class_names else "none: the model has no class names"
        raise ValueError(f"--label {label!r} is neither a class name ({choices}) nor a number") from None


def run_classify(client: BitmojiClient, args) -> int:
    predictions = []
    for start in range(0, len(args.images), CLASSIFY_CHUNK):
        predictions += client.classify([Path(p) for p in args.images[start : start + CLASSIFY_CHUNK]])
    if args.json:
        print(json.dumps([{"file": f, **vars(p)} for f, p in zip(args.images, predictions)], indent=2))
        return 0
    rows = [(f, p.label, p.probability, p.logit) for f, p in zip(args.images, predictions)]
    print(table(("file", "label", "probability", "logit"), rows))
    print(
        f"model version: {', '.join(dict.fromkeys(p.model_version for p in predictions))}"
    )  # two if it reloaded meanwhile
    return 0


def run_probe(client: BitmojiClient, args) -> int:
    info = client.model_info()
    target = target_value(args.label, info.class_names, info.positive_class)
    result = client.gradient_probe([Path(args.image)], [target], args.loss, saliency=args.saliency is not None)
    if args.saliency is not None:
        if result.saliency_pngs[0] is None:
            print(f"{PROG}: the server sent no saliency map for {args.image}", file=sys.stderr)
            return 1
        Path(args.saliency).write_bytes(result.saliency_pngs[0])
    if args.json:
        print(
            json.dumps(
                {
                    "loss": result.loss,
                    "outputs": result.outputs.reshape(-1).tolist(),
                    "parameters": {
                        n: {"shape": list(g.shape), "norm": g.norm, "max_abs": g.max_abs, "mean_abs": g.mean_abs}
                        for n, g in result.parameters.items()
                    },
                    "saliency": args.saliency,
                    "model_version": result.model_version,
                },
                indent=2,
            )
        )
        return 0
    outputs = ", ".join(f"{v:.4f}" for v in result.outputs.reshape(-1).tolist())
    print(f"loss ({args.loss}, target {target:g}): {result.loss:.6f}   output: {outputs}")
    rows = [
        (n, "x".join(map(str, g.shape)) or "scalar", g.norm, g.max_abs, g.mean_abs)
        for n, g in result.parameters.items()
    ]
    print(
        table(("parameter", "shape", "grad norm", "max abs", "mean abs"), rows, float_format=".3e")
    )  # gradients span decades
    if args.saliency is not None:
        print(f"saliency map written to {args.saliency}")
    print(f"model version: {result.model_version}")
    return 0


def run_info(client: BitmojiClient, args) -> int:
    info = client.model_info()
    if args.json:
        print(
            json.dumps(
                vars(info) | {"class_names": list(info.class_names), "input_shape": list(info.input_shape)}, indent=2
            )
        )
        return 0
    fields = [
        ("model version", info.model_version),
        ("architecture", info.architecture or "-"),
        ("classes", ", ".join(info.class_names) or "-"),
        ("positive class", info.positive_class or "-"),
        ("input shape", "x".join(map(str, info.input_shape)) or "-"),
        ("device", info.device),
        ("torch threads", info.torch_threads),
        ("max batch size", info.max_batch_size),
        ("max batch delay", f"{info.max_batch_delay_ms:g} ms"),
        ("max items per call", info.max_items_per_call),
        ("gradient probe", "enabled" if info.gradient_probe_enabled else "disabled"),
        ("model sha256", info.model_sha256),
    ]
    for name, value in sorted(info.metadata.get("metrics", {}).items()):
        fields.append((f"metric {name}", f"{value:.4f}" if isinstance(value, float) else value))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}} {value}")
    return 0


def run_health(client: BitmojiClient, args) -> int:
    status = client.health(args.service)
    print(json.dumps({"status": status}) if args.json else status)
    return 0 if status == "SERVING" else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to a bitmoji classifier server over gRPC.",
        epilog="A bearer token for servers that want one is read from the environment variable BITMOJI_TOKEN.",
    )
    p.add_argument(
        "--target",
        default=os.environ.get("BITMOJI_TARGET", DEFAULT_TARGET),
        help="host:port, or dns:///name:port (env BITMOJI_TARGET; default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="deadline of each call in seconds, retries included (default %(default)s)",
    )
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

    i = sub.add_parser("info", help="the model the server runs, and how")
    i.set_defaults(run=run_info)

    h = sub.add_parser("health", help="print the health status; exit 1 unless SERVING")
    h.add_argument("--service", default="", help='"" for the server (default) or bitmoji.v1.Classifier')
    h.set_defaults(run=run_health)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        root_certificates = args.ca_file.read_bytes() if args.ca_file else None
        if (args.cert is None) != (args.key is None):
            raise ValueError("--cert and --key go together")
        certificate_chain = args.cert.read_bytes() if args.cert else None
        private_key = args.key.read_bytes() if args.key else None
        with BitmojiClient(
            args.target,
            timeout=args.timeout,
            tls=args.tls or certificate_chain is not None,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=os.environ.get("BITMOJI_TOKEN") or None,
        ) as client:
            return args.run(client, args)
    except BitmojiError as error:
        print(
            f"{PROG}: {args.command} failed: {error.code.name}: {error.details} (target {args.target})", file=sys.stderr
        )
    except BrokenPipeError:  # the reader went away (`| head`): nothing to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as error:
        print(
            f"{PROG}: {error.filename or ''}{': ' if error.filename else ''}{error.strerror or error}", file=sys.stderr
        )
    except (ValueError, TypeError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
