"""`bitmoji-train`: synth | fit | predict | publish (also `python -m bitmoji.trainer`).

Every option's help says what it does and its default; `--help` needs no torch.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from bitmoji.trainer.early_stopping import RULES
from bitmoji.trainer.recipes import RECIPES, describe

DEVICES = ["auto", "cpu", "cuda"]


def _synth_parser(sub) -> None:
    from bitmoji.trainer import synth  # numpy and Pillow, no torch: its defaults are the ones shown

    defaults = {name: p.default for name, p in inspect.signature(synth.generate).parameters.items()}
    about = "write the embedded default data set (cartoon avatars, classes eva / not_eva) in ImageFolder layout"
    s = sub.add_parser("synth", help=about, description=about + "; the same seed gives byte-identical files")
    s.add_argument("--out", required=True, help="folder to write train/ and valid/ into (required)")
    s.add_argument(
        "--n-train",
        type=int,
        default=defaults["n_train"],
        help="training images, half per class (default: %(default)s)",
    )
    s.add_argument(
        "--n-valid",
        type=int,
        default=defaults["n_valid"],
        help="validation images, half per class (default: %(default)s)",
    )
    s.add_argument(
        "--seed", type=int, default=defaults["seed"], help="random seed of the drawing (default: %(default)s)"
    )


def _fit_parser(sub) -> None:
    about = "train a model on DATA/train, validate on DATA/valid, export OUT/model.pt"
    p = sub.add_parser(
        "fit",
        help=about,
        description=about + " (TorchScript with its metadata), with history.json/csv, curves.png and checkpoint.pt",
    )
    p.add_argument(
        "--data", required=True, help="folder holding train/ and valid/ (ImageFolder layout, two classes) (required)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: model.pt, history.json/csv, curves.png, checkpoint.pt (required)",
    )
    p.add_argument(
        "--arch",
        choices=list(RECIPES),
        default="mlp",
        help="mlp: the lecture's BitmojiClassifier; cnn: the accurate CNN, about as cheap to serve; "
        "vgg: the first CNN, 10x costlier (default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help=f"most passes over the training set (default: {describe('epochs')})"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per optimizer step; under torchrun the global batch, split among processes (default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help=f"learning rate (default: {describe('lr')}; mlp's is the lecture's)"
    )
    p.add_argument(
        "--optimizer",
        choices=["adam", "adamw"],
        default="adam",
        help="adam (the lecture's) or adamw (default: %(default)s)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="L2 weight decay, decoupled with adamw (default: %(default)s)",
    )
    p.add_argument(
        "--schedule",
        choices=["none", "cosine"],
        default=None,
        help=f"learning-rate schedule over --epochs (default: {describe('schedule')})",
    )
    p.add_argument(
        "--dropout", type=float, default=0.1, help="dropout probability (default: %(default)s, the lecture's)"
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"random flip, shift and brightness/contrast jitter of training images (default: {describe('augment')})",
    )
    p.add_argument(
        "--clip-grad-norm",
        type=float,
        default=None,
        help="clip the gradients' total norm to this (default: no clipping)",
    )
    p.add_argument(
        "--early-stopping",
        choices=RULES,
        default="best",
        help="lecture: valid loss rose PATIENCE epochs in a row; "
        "best: no improvement by MIN_DELTA for PATIENCE epochs (default: %(default)s)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help=f"epochs the early-stopping rule waits (default: {describe('patience')})",
    )
    p.add_argument(
        "--min-delta",
        type=float,
        default=0.0,
        help="smallest drop of the valid loss that counts as an improvement (default: %(default)s)",
    )
    p.add_argument(
        "--restore-best",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"export the best valid-loss epoch's weights, not the last epoch's (default: {describe('restore_best')})",
    )
    p.add_argument(
        "--positive-class",
        default=None,
        help="class that probability refers to (default: the one not named not_*)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, shuffling, dropout and augmentation: same seed, same history on CPU "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA when present, else CPU (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt, as if never stopped (default: start afresh)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars; epoch lines still print (default: bars on a terminal)",
    )
    p.add_argument(
        "--repository",
        default=None,
        help="also publish model.pt to this model repository as the next version of --name: "
        "REPOSITORY/NAME/<version>/model.pt (default: publish nothing)",
    )
    p.add_argument("--name", default=None, help="the model's name in --repository (default: the --arch, e.g. cnn)")


def _predict_parser(sub) -> None:
    about = "classify image files with an exported model (any size or mode), as the lecture's predict_unseen"
    pr = sub.add_parser("predict", help=about, description=about)
    pr.add_argument("--model", required=True, help="an exported model file, e.g. runs/cnn/model.pt (required)")
    pr.add_argument(
        "--plot", default=None, help="also write the images with their predictions to this PNG (default: no plot)"
    )
    pr.add_argument("--device", choices=DEVICES, default="cpu", help="where the model runs (default: %(default)s)")
    pr.add_argument("images", nargs="+", help="image files (PNG, JPEG, anything Pillow reads)")


def _publish_parser(sub) -> None:
    about = "publish an exported model as the next version of NAME in a model repository: REPOSITORY/NAME/<version>/"
    pu = sub.add_parser(
        "publish",
        help=about,
        description=about + "model.pt, versions 1, 2, 3, ...; the version folder appears complete or not at all",
    )
    pu.add_argument("--model", required=True, help="an exported model file, e.g. runs/cnn/model.pt (required)")
    pu.add_argument("--repository", required=True, help="the model repository's folder (required)")
    pu.add_argument(
        "--name", required=True, help="the model's name: letters, digits, '-', '_', '.' (not first) (required)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitmoji-train",
        description="train the bitmoji classifier, export it, try it on images; COMMAND --help for each one's options",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _synth_parser(sub)
    _fit_parser(sub)
    _predict_parser(sub)
    _publish_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from bitmoji.core.device import DeviceError
    from bitmoji.core.modelfile import ModelFileError
    from bitmoji.core.preprocess import ImageError
    from bitmoji.trainer.data import DataError
    from bitmoji.trainer.publish import PublishError
    from bitmoji.trainer.train import TrainingError

    try:
        if args.command == "synth":
            from bitmoji.trainer import synth

            path = synth.generate(args.out, n_train=args.n_train, n_valid=args.n_valid, seed=args.seed)
            print(f"data set in {path}")
        elif args.command == "fit":
            from bitmoji.trainer.train import TrainConfig, fit

            fields = {k: v for k, v in vars(args).items() if k != "command"}
            fit(TrainConfig(**fields))
        elif args.command == "publish":
            from bitmoji.core.modelfile import load_model
            from bitmoji.trainer.publish import MODEL_FILE, publish_version

            load_model(args.model)  # a file the server could not load stays out of the repository
            print(f"published {publish_version(args.model, args.repository, args.name) / MODEL_FILE}")
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
    except (DataError, DeviceError, ModelFileError, ImageError, PublishError, TrainingError, OSError) as exc:
        print(f"bitmoji-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
