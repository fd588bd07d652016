"""The training loop: the lecture's, from an in-memory data set, with early stopping and resumable checkpoints.

Read it top to bottom: `fit` reads the run in order, in the spirit of nanoGPT's
train.py (set-up, data, model, resume, the epoch loop, export); everything it
needs is in `TrainConfig`. Each phase it calls is a function that can be run
and tested on its own, as in torchvision's references/classification/train.py:
`train_one_epoch`, `evaluate`, `save_checkpoint` / `load_checkpoint` and `export`.

Under torchrun the same loop runs data-parallel (see trainer/distributed.py):
`batch_size` stays the global batch, each rank takes its share of every
epoch's permutation, and the sums behind the metrics are added up across ranks.
The permutation comes from DistributedSampler (seeded by `seed` and the epoch)
in one process too, and rank r takes its positions r, r + world, ..., so the
union of the ranks' batch k is exactly the one-process batch k (when the
training set divides by the number of processes; otherwise the sampler repeats
a few samples to even the shards out). Dropout and augmentation draw from
`seed + rank`, so ranks do not repeat each other's noise; rank 0 draws what
one process would. The checkpoint keeps every rank's random state.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from bitmoji.core.device import resolve_device
from bitmoji.core.modelfile import build_metadata, export_model
from bitmoji.trainer import data as data_module
from bitmoji.trainer import distributed, publish
from bitmoji.trainer.early_stopping import EarlyStopping
from bitmoji.trainer.models import build_model
from bitmoji.trainer.recipes import RECIPES

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.pt"
# TrainConfig fields left out of the model's metadata: where things are and how the run was driven
NOT_HYPERPARAMETERS = ("data", "out", "resume", "progress", "repository", "name")


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "mlp"  # mlp | cnn | vgg
    # None: the arch's recipe (trainer/recipes.py: every field of Recipe) for epochs, lr, schedule, augment,
    # patience, restore_best
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "adam"  # adam (the lecture's) | adamw
    weight_decay: float = 0.0  # L2 penalty (Adam) or decoupled decay (AdamW)
    schedule: str | None = None  # none | cosine
    dropout: float = 0.1
    augment: bool | None = None
    clip_grad_norm: float | None = None
    early_stopping: str = "best"  # lecture | best
    patience: int | None = None
    min_delta: float = 0.0
    restore_best: bool | None = None
    positive_class: str | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    progress: bool = True
    repository: str | None = None  # also publish model.pt as the next version of `name` in this model repository
    name: str | None = None  # None: the arch

    def resolved(self) -> TrainConfig:
        """The config with every unset option taken from the arch's recipe."""
        if self.arch not in RECIPES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose from {sorted(RECIPES)}")
        cfg = copy.copy(self)
        recipe = RECIPES[cfg.arch]
        for option in fields(recipe):
            if getattr(cfg, option.name) is None:
                setattr(cfg, option.name, getattr(recipe, option.name))
        return cfg


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss or gradient); the message says why."""


@dataclass
class FitResult:
    model_path: Path
    history: list[dict]
    best_epoch: int
    stop_reason: str
    metadata: dict = field(repr=False)
    seconds: float = 0.0
    published: Path | None = None  # the version folder in --repository


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 8) -> torch.Tensor:
    """Random horizontal flip, shift of up to `max_shift` pixels and brightness/contrast jitter, per image."""
    n = x.shape[0]
    r = torch.rand(n, 5, generator=generator).to(x.device)
    x = torch.where((r[:, 0] < 0.5)[:, None, None, None], x.flip(-1), x)
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    shifts = (r[:, 1:3] * (2 * max_shift + 1)).long().tolist()
    h, w = x.shape[-2:]
    x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts)])
    brightness = (0.8 + 0.4 * r[:, 3])[:, None, None, None]
    contrast = (0.8 + 0.4 * r[:, 4])[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp_(0.0, 1.0)


@torch.inference_mode()
def evaluate(
    model: nn.Module, images: data_module.ImageSet, device: torch.device, batch_size: int = 256
) -> tuple[float, float]:
    """Loss and accuracy over every sample (not the lecture's mean of batch means).

    Under torchrun each rank takes every world_size-th sample (no padding) and
    the sums are added up, so each sample counts exactly once.
    """
    model.eval()
    index = torch.arange(distributed.rank(), len(images), distributed.world_size())
    loss_sum, correct = 0.0, 0
    for start in range(0, len(index), batch_size):
        x, y = images.batch(index[start : start + batch_size], device)
        logits = model(x).squeeze(1)
        loss_sum += float(nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        correct += int(((logits > 0).float() == y).sum())
    loss_sum, correct, count = distributed.all_sum([loss_sum, correct, len(index)])
    return loss_sum / count, correct / count


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: data_module.ImageSet,
    order: torch.Tensor,
    batch_size: int,
    device: torch.device,
    *,
    epoch: int,
    epochs: int | None = None,
    augment_generator: torch.Generator | None = None,
    clip_grad_norm: float | None = None,
    progress: bool = True,
) -> dict:
    """One pass over `order` (this rank's samples), `batch_size` at a time: zero_grad, forward, backward, step.

    `model` is what trains (the DDP wrapper under torchrun). Returns train_loss and train_accuracy over every
    rank's samples, and each parameter's gradient norm averaged over the batches (`grad_norms`). A non-finite
    loss or gradient raises TrainingError before the optimizer steps on it.
    """
    parameters = dict(distributed.unwrap(model).named_parameters())
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    grad_norm_sums = torch.zeros(len(parameters))
    batches = range(0, len(order), batch_size)
    desc = f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}"
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if progress else True)  # None: terminals
    for start in bar:
        x, y = images.batch(order[start : start + batch_size], device)
        if augment_generator is not None:
            x = augment(x, augment_generator)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x).squeeze(1)
        loss = criterion(logits, y)
        if not torch.isfinite(loss.detach()):
            raise TrainingError(
                f"epoch {epoch}: the loss became {float(loss.detach())} (try a lower --lr or --clip-grad-norm)"
            )
        loss.backward()  # DDP: gradients are averaged over ranks here, so the norms and the step agree everywhere
        norms = torch.stack(torch._foreach_norm([p.grad for p in parameters.values()])).cpu()
        if not torch.isfinite(norms).all():
            bad = [list(parameters)[i] for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist()]
            raise TrainingError(
                f"epoch {epoch}: non-finite gradients in {bad} "
                "(exploding gradients: lower --lr or set --clip-grad-norm)"
            )
        grad_norm_sums += norms
        if clip_grad_norm:
            nn.utils.clip_grad_norm_(parameters.values(), clip_grad_norm)
        optimizer.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int(((logits.detach() > 0).float() == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen])
    return {
        "train_loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "grad_norms": dict(zip(parameters, (grad_norm_sums / len(batches)).tolist(), strict=True)),
    }


@dataclass
class Checkpoint:
    """What `load_checkpoint` hands back besides the objects it restored in place."""

    epoch: int  # the last epoch it holds; training goes on from epoch + 1
    best_model: dict  # the best epoch's state_dict, for --restore-best
    history: list[dict]


def save_checkpoint(
    path: Path,
    *,
    epoch: int,
    config: dict,
    model: nn.Module,
    best_model: dict,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    stopper: EarlyStopping,
    history: list[dict],
    generator: torch.Generator,
) -> None:
    """Everything the next epoch depends on, so that --resume continues exactly as if never stopped.

    Call it on every rank: it gathers each rank's random state (dropout, augmentation), and rank 0 writes.
    """
    rng_states = distributed.all_gather_object(_rng_state(generator))
    if not distributed.is_main():
        return
    partial = path.with_name(f".{path.name}.partial")  # then a rename: a kill mid-write keeps the previous epoch's
    torch.save(
        {
            "epoch": epoch,
            "config": config,
            "model": model.state_dict(),
            "best_model": best_model,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "early_stopping": stopper.state_dict(),
            "history": history,
            "rng": rng_states,
        },
        partial,
    )
    os.replace(partial, path)


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    stopper: EarlyStopping,
    generator: torch.Generator,
) -> Checkpoint | None:
    """Restore what `save_checkpoint` wrote into these objects (None, and nothing changed, when there is no file).

    Call it on every rank: rank 0 reads the file (weights only: a checkpoint cannot run code) and sends it to
    the others, so no shared file system is needed.
    """
    ckpt = None
    if distributed.is_main() and path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt = distributed.broadcast_object(ckpt)
    if ckpt is None:
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    stopper.load_state_dict(ckpt["early_stopping"])
    rng_states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per rank
    world = distributed.world_size()
    if len(rng_states) == world:
        _set_rng_state(rng_states[distributed.rank()], generator)
    else:
        distributed.print0(
            f"--resume: the checkpoint holds {len(rng_states)} process(es)' random states, this run has {world}: "
            "dropout/augmentation restart from the seed"
        )
    return Checkpoint(ckpt["epoch"], ckpt["best_model"], ckpt["history"])


def write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=2))
    scalar_keys = [k for k in history[0] if not isinstance(history[0][k], dict)] if history else []
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def describe_data(train: data_module.ImageSet, valid: data_module.ImageSet, data: str | Path) -> str:
    """What a run learnt from, for the curves' title: `eva vs not_eva (480 train / 160 valid images, data/synth)`."""
    others = [name for name in train.class_names if name != train.positive_class]
    return f"{train.positive_class} vs {' / '.join(others)} ({len(train)} train / {len(valid)} valid images, {data})"


def export(
    model: nn.Module,
    out: Path,
    *,
    cfg: TrainConfig,
    train: data_module.ImageSet,
    valid: data_module.ImageSet,
    history: list[dict],
    stopper: EarlyStopping,
    served_epoch: int,
    stop_reason: str,
    processes: int,
) -> tuple[Path, dict]:
    """Write the run's outputs: OUT/model.pt (TorchScript with its metadata, verified), history.json/csv, curves.png.

    `model` holds the weights to serve, those of epoch `served_epoch`. Returns the model file's path and metadata.
    """
    scalars = lambda row: {k: v for k, v in row.items() if not isinstance(v, dict)}  # noqa: E731
    metadata = build_metadata(
        architecture=cfg.arch,
        class_names=train.class_names,
        positive_class=train.positive_class,
        model=model,
        hyperparameters={k: v for k, v in asdict(cfg).items() if k not in NOT_HYPERPARAMETERS}
        | {"processes": processes},
        metrics={
            "final": scalars(history[-1]),
            "best": scalars(history[max(stopper.best_epoch, 1) - 1]),  # the lowest valid loss
            "served": scalars(history[served_epoch - 1]),  # the epoch whose weights the file holds
            "served_epoch": served_epoch,
            "stop_reason": stop_reason,
        },
        data_fingerprint=data_module.fingerprint(train, valid),
    )
    plain = build_model(cfg.arch, dropout=cfg.dropout)  # plain BatchNorm again: SyncBatchNorm cannot be scripted
    plain.load_state_dict(model.state_dict())
    model_path = export_model(plain, out / MODEL_FILE, metadata)
    write_history(out, history)
    from bitmoji.trainer.plots import plot_curves  # matplotlib is slow to import; only needed here

    plot_curves(
        history,
        out / "curves.png",
        stopped_epoch=stopper.stopped_epoch,
        best_epoch=stopper.best_epoch,
        title=f"{cfg.arch}: {describe_data(train, valid, cfg.data)}",
    )
    return model_path, metadata


def fit(config: TrainConfig) -> FitResult:
    cfg = config.resolved()
    started = time.perf_counter()
    out = Path(cfg.out)
    if cfg.repository is not None:
        publish.check_name(cfg.name or cfg.arch)  # a bad name fails now, not after the training
    elif cfg.name is not None:
        raise publish.PublishError("--name names the model in --repository: give a --repository too")
    device = distributed.setup(resolve_device(cfg.device))  # under torchrun: join the process group
    rank, world, master = distributed.rank(), distributed.world_size(), distributed.is_main()
    print0 = distributed.print0
    if cfg.batch_size % world:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly among the {world} processes"
        )
    local_batch_size = cfg.batch_size // world
    progress = cfg.progress and master
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.repository is not None:
            Path(cfg.repository).mkdir(parents=True, exist_ok=True)  # an unusable one fails now too
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)  # dropout (and the initial weights, but DDP gives every rank rank 0's)
    generator = torch.Generator().manual_seed(cfg.seed + rank)  # augmentation

    # data: decoded once, kept in memory as uint8; every epoch a permutation by (seed, epoch), this rank's share of it
    train, valid = data_module.load_dataset(cfg.data, cfg.positive_class, progress=progress)
    sampler = DistributedSampler(range(len(train)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    print0(
        f"data: {len(train)} train / {len(valid)} valid images, "
        f"classes {train.class_names}, positive {train.positive_class!r}"
    )

    # model, loss, optimizer
    model = build_model(cfg.arch, dropout=cfg.dropout).to(device)
    criterion = nn.BCEWithLogitsLoss()
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    # fused: one kernel for the whole update instead of a dozen tensor ops per parameter; on CPU it cut
    # the MLP's training step from 81 to 26 ms (its 6.3M-weight first layer made Adam 40% of a step)
    optimizer = optimizer_class(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs) if cfg.schedule == "cosine" else None
    )
    stopper = EarlyStopping(cfg.early_stopping, cfg.patience, cfg.min_delta)
    history: list[dict] = []
    best_state = copy.deepcopy(model.state_dict())
    start_epoch = 1

    # resume: model, optimizer, schedule, early stopping, history and every rank's random state
    checkpoint_path = out / CHECKPOINT
    if cfg.resume:
        ckpt = load_checkpoint(
            checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, stopper=stopper, generator=generator
        )
        if ckpt is None:
            print0(f"--resume: no checkpoint at {checkpoint_path}, starting afresh")
        else:
            best_state, history, start_epoch = ckpt.best_model, ckpt.history, ckpt.epoch + 1
            print0(f"resumed from {checkpoint_path} after epoch {ckpt.epoch}")

    n_params = sum(p.numel() for p in model.parameters())
    print0(
        f"model: {cfg.arch}, {n_params:,} parameters, device {device}, {torch.get_num_threads()} threads, lr {cfg.lr:g}"
    )
    if world > 1:
        print0(f"data parallel: {world} processes, {local_batch_size} samples each per batch of {cfg.batch_size}")
    ddp_model = distributed.wrap(model, device)  # trains `model` (same parameters); `model` is what we save

    # the loop: train, validate, decide whether to stop, checkpoint
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopper.stopped_epoch >= 0:
            break  # a resumed run that had already stopped
        epoch_start = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))  # this rank's samples: every world-th of the epoch's permutation
        train_metrics = train_one_epoch(
            ddp_model,
            criterion,
            optimizer,
            train,
            order,
            local_batch_size,
            device,
            epoch=epoch,
            epochs=cfg.epochs,
            augment_generator=generator if cfg.augment else None,
            clip_grad_norm=cfg.clip_grad_norm,
            progress=progress,
        )
        if scheduler is not None:
            scheduler.step()
        distributed.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, which it saves, on every rank
        valid_loss, valid_acc = evaluate(model, valid, device)
        row = {
            "epoch": epoch,
            "train_loss": train_metrics["train_loss"],
            "train_accuracy": train_metrics["train_accuracy"],
            "valid_loss": valid_loss,
            "valid_accuracy": valid_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - epoch_start,
            "grad_norms": train_metrics["grad_norms"],
        }
        history.append(row)
        print0(
            f"Epoch {epoch}: Train Loss {row['train_loss']:.3f} Train Accuracy {row['train_accuracy']:.3f} "
            f"Valid Loss {valid_loss:.3f} Valid Accuracy {valid_acc:.3f} ({row['seconds']:.1f}s)",
            flush=True,
        )
        stop = distributed.broadcast_object(stopper.step(epoch, valid_loss))  # rank 0 decides; all ranks stop together
        if master and stopper.is_best(epoch):
            best_state = copy.deepcopy(model.state_dict())
        save_checkpoint(
            checkpoint_path,
            epoch=epoch,
            config=asdict(cfg),
            model=model,
            best_model=best_state,
            optimizer=optimizer,
            scheduler=scheduler,
            stopper=stopper,
            history=history,
            generator=generator,
        )
        if stop:
            break

    # export (rank 0 alone writes the model, history and curves): the best epoch's weights unless --no-restore-best
    stop_reason = stopper.reason or f"ran all {cfg.epochs} epochs"
    distributed.teardown()
    if not master:
        return FitResult(out / MODEL_FILE, history, stopper.best_epoch, stop_reason, {}, time.perf_counter() - started)
    print(stop_reason)
    served_epoch = history[-1]["epoch"]
    if cfg.restore_best and stopper.best_epoch >= 1:
        model.load_state_dict(best_state)
        served_epoch = stopper.best_epoch
        print(f"restored the best weights, from epoch {stopper.best_epoch} (valid loss {stopper.best_loss:.4f})")
    model_path, metadata = export(
        model,
        out,
        cfg=cfg,
        train=train,
        valid=valid,
        history=history,
        stopper=stopper,
        served_epoch=served_epoch,
        stop_reason=stop_reason,
        processes=world,
    )
    seconds = time.perf_counter() - started
    print(
        f"wrote {model_path} (version {metadata['model_version']}), "
        f"history.json/csv and curves.png in {out} ({seconds:.0f}s)"
    )
    published = None
    if cfg.repository is not None:
        published = publish.publish_version(model_path, cfg.repository, cfg.name or cfg.arch)
        print(f"published {published / publish.MODEL_FILE}")
    return FitResult(model_path, history, stopper.best_epoch, stop_reason, metadata, seconds, published)
