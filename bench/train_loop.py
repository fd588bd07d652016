"""The project's training loop vs the lecture's, side by side on the same model, data, batch size and seed.

The lecture's loop: ImageFolder (PIL decode) + Resize + ToTensor through a
DataLoader, decoding every PNG again every epoch. The project's loop: decode
once into a uint8 tensor (bitmoji.trainer.data), index batches from memory, and
update with the fused Adam kernel (bitmoji.trainer.train's; same algorithm and
hyper-parameters as the lecture's Adam).
Both train the lecture's MLP; the figure is training images per second
(decode included: the project's one-off decode is added to its time).

    python -m bench.train_loop --data ../shared/data/bitmoji --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torchvision import datasets, transforms

from bitmoji.trainer.data import load_dataset
from bitmoji.trainer.models import BitmojiClassifier
from bitmoji.trainer.train import evaluate


def lecture_loop(data: str, epochs: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.Resize((128, 128)), transforms.ToTensor()])
    train = datasets.ImageFolder(f"{data}/train", transform=transform)
    valid = datasets.ImageFolder(f"{data}/valid", transform=transform)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
    valid_loader = torch.utils.data.DataLoader(valid, batch_size=batch_size)
    model = BitmojiClassifier()
    criterion = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(x).squeeze(1), y.float())
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in valid_loader:
            correct += int(((model(x).squeeze(1) > 0).long() == y).sum())
    return {
        "loop": "lecture (decode every epoch)",
        "seconds": seconds,
        "images_per_s": epochs * len(train) / seconds,
        "valid_accuracy": correct / len(valid),
    }


def project_loop(data: str, epochs: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    start = time.perf_counter()
    # positive class = index 1, as the lecture's labels
    train, valid = load_dataset(data, positive_class=None, progress=False)
    decode_seconds = time.perf_counter() - start
    model = BitmojiClassifier()
    criterion = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1e-4, fused=True
    )  # as bitmoji.trainer.train: the same Adam, one kernel
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), batch_size):
            x, y = train.batch(order[i : i + batch_size])
            optimizer.zero_grad()
            loss = criterion(model(x).squeeze(1), y)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    _, accuracy = evaluate(model, valid, torch.device("cpu"))
    return {
        "loop": "project (decode once)",
        "seconds": seconds,
        "decode_seconds": decode_seconds,
        "images_per_s": epochs * len(train) / seconds,
        "valid_accuracy": accuracy,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/bitmoji")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    rows = []
    for loop in (lecture_loop, project_loop):
        print(f"running {loop.__name__} for {args.epochs} epochs...", flush=True)
        rows.append(loop(args.data, args.epochs, args.batch_size, args.seed))
        print(f"  {rows[-1]}", flush=True)
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    # the one-off decode is paid once per run: over more epochs the speed-up tends to this
    per_epoch = rows[0]["seconds"] / (rows[1]["seconds"] - rows[1]["decode_seconds"])
    print(
        f"speed-up of the project's loop: {speedup:.2f}x with its one-off decode, "
        f"{per_epoch:.2f}x per epoch once decoded "
        f"(valid accuracy {rows[0]['valid_accuracy']:.3f} vs {rows[1]['valid_accuracy']:.3f})"
    )
    result = {
        "rows": rows,
        "speedup": speedup,
        "speedup_per_epoch": per_epoch,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
