"""`bitmoji-train`: synth | fit | predict (also `python -m bitmoji.trainer`)."""

from __future__ import annotations

import argparse
import sys

from bitmoji.trainer.early_stopping import RULES


def _fit_parser(sub) -> None:
    p = sub.add_parser("fit", help="train a model on DATA/train, validate on DATA/valid, export OUT/model.pt")
    p.add_argument("--data", required=True, help="folder holding train/ and valid/ (ImageFolder layout, two classes)")
    p.add_argument("--out", required=True, help="output folder: model.pt, history.json/csv, curves.png, checkpoint.pt")
    p.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 1e-4 for mlp as the lecture, 2e-3 for cnn)"
    )
    p.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    p.add_argument("--schedule", choices=["none", "cosine"], default="none", help="learning-rate schedule")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=None, help="flip/shift/jitter (default: on for cnn)"
    )
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument(
        "--early-stopping",
        choices=RULES,
        default="best",
        help="lecture: valid loss rose PATIENCE epochs in a row; best: no improvement by MIN_DELTA for PATIENCE epochs",
    )
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--min-delta", type=float, default=0.0)
    p.add_argument(
        "--no-restore-best",
        dest="restore_best",
        action="store_false",
        help="export the last epoch's weights, not the best",
    )
    p.add_argument(
        "--positive-class", default=None, help="class that probability refers to (default: the one not named not_*)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars (epoch lines still print)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitmoji-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write the embedded default data set (cartoon avatars, classes eva / not_eva)")
    s.add_argument("--out", required=True)
    s.add_argument("--n-train", type=int, default=None)
    s.add_argument("--n-valid", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    _fit_parser(sub)
    pr = sub.add_parser("predict", help="classify image files with an exported model (any size or mode)")
    pr.add_argument("--model", required=True)
    pr.add_argument("--plot", default=None, help="also write the images with their predictions to this PNG")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    pr.add_argument("images", nargs="+")
    args = parser.parse_args(argv)

    from bitmoji.core.device import DeviceError
    from bitmoji.core.modelfile import ModelFileError
    from bitmoji.core.preprocess import ImageError
    from bitmoji.trainer.data import DataError
    from bitmoji.trainer.train import TrainingError

    try:
        if args.command == "synth":
            from bitmoji.trainer import synth

            sizes = {k: v for k, v in (("n_train", args.n_train), ("n_valid", args.n_valid)) if v is not None}
            path = synth.generate(args.out, seed=args.seed, **sizes)
            print(f"data set in {path}")
        elif args.command == "fit":
            from bitmoji.trainer.train import TrainConfig, fit

            fields = {k: v for k, v in vars(args).items() if k != "command"}
            fit(TrainConfig(**fields))
        else:
            from bitmoji.core.device import resolve_device
            from bitmoji.core.modelfile import load_model
            from bitmoji.trainer.predict import plot_predictions, predict_files

            model = load_model(args.model, resolve_device(args.device))
            predictions = predict_files(model, args.images)
            width = max(len(p.path) for p in predictions)
            print(f"{'image':<{width}}  {'label':<10} {'probability':>11} {'logit':>8}")
            for p in predictions:
                print(f"{p.path:<{width}}  {p.label:<10} {p.probability:>11.4f} {p.logit:>8.3f}")
            if args.plot:
                print(f"wrote {plot_predictions(predictions, args.plot)}")
    except (DataError, DeviceError, ModelFileError, ImageError, TrainingError, OSError) as exc:
        print(f"bitmoji-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
