"""Train the Fashion-MNIST classifier behind the metrics; write its weights and their JSON record.

    python scripts/train_fmnist_classifier.py [--root /usr/share/datasets/fashion-mnist] [--epochs 6] [--garment-side
    16]

Writes sprintdit/metrics/weights/fmnist_classifier.safetensors and fmnist_classifier.json (sha256, test
accuracy, settings, training time) unless --out names another .safetensors path. With --garment-side S it trains
and tests on garments shrunk to S x S and grown back (what `classify_garments` reads), into fmnist_garment16.*. CPU only
and
deterministic: fixed seeds, deterministic algorithms, a fixed thread count, the library's seeded batch order.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sprintdit.data import index_batches
from sprintdit.fashion_mnist import FashionMNIST
from sprintdit.metrics import class_agreement, feature_stats, frechet_distance
from sprintdit.files import sha256_file
from sprintdit.layouts import shrink
from sprintdit.metrics.fmnist_classifier import (
    GARMENT_WEIGHTS,
    WEIGHTS,
    FMNISTClassifier,
    classify,
    record_path,
    regrown,
)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
EPOCHS = 6
BATCH = 128
LR = 0.05  # SGD with Nesterov momentum; linear warm-up, then cosine decay to 0
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_STEPS = 200
MAX_SHIFT = 2  # pixels of random translation each way (the 28x28 images sit in a 2-pixel black border)
SEED = 0
THREADS = 2
BLACK = -1.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (B, 1, H, W), each image shifted by up to MAX_SHIFT pixels each way, black filling in."""
    b, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=BLACK)  # (B, 1, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, b, 1), generator=gen)
    rows, cols = dy + torch.arange(h), dx + torch.arange(w)  # (B, H), (B, W)
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (B, 1, H, W)


class Shrunk:
    """A Fashion-MNIST split with every garment shrunk to side x side and grown back to 28x28 in the 32x32 frame."""

    def __init__(self, data: FashionMNIST, side: int):
        garments = shrink(data.images[:, 0, 2:-2, 2:-2], side) * 2 - 1  # (N, side, side) in [-1, 1]
        self.images, self.labels = regrown(garments), data.labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]


def learning_rate(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return LR * (step + 1) / WARMUP_STEPS
    return 0.5 * LR * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / (total - WARMUP_STEPS)))


def evaluate(model: FMNISTClassifier, train_set: FashionMNIST, test_set: FashionMNIST) -> dict:
    """Test accuracy, and the Frechet distance between the train and test splits in the model's features:
    the floor that generated samples are measured against."""
    model.eval()
    train_features, _ = classify(model, train_set.load(torch.arange(len(train_set)))[0])
    test_x, test_y = test_set.load(torch.arange(len(test_set)))
    test_features, test_logits = classify(model, test_x)
    fid = frechet_distance(*feature_stats(train_features), *feature_stats(test_features))
    return {"test_accuracy": round(class_agreement(test_logits, test_y), 4), "train_vs_test_fid": round(fid, 4)}


def train(train_set: FashionMNIST, epochs: int) -> FMNISTClassifier:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = FMNISTClassifier().to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on biases and norm scales
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
        lr=LR,
        momentum=MOMENTUM,
        nesterov=True,
    )
    steps_per_epoch = len(train_set) // BATCH
    total = epochs * steps_per_epoch
    batches = index_batches(len(train_set), BATCH, SEED, position=0)
    model.train()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, total)
        x, y = train_set.load(next(batches))
        x = augment(x, gen).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % steps_per_epoch == 0:
            print(f"epoch {(step + 1) // steps_per_epoch}/{epochs}: loss {loss.item():.4f}", flush=True)
    return model.to(memory_format=torch.contiguous_format)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument(
        "--out", type=Path, help="weights file; the JSON record goes beside it (default: the shipped one)"
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument(
        "--garment-side",
        type=int,
        help="train and test on garments shrunk to this side and grown back (16: moving clips)",
    )
    args = parser.parse_args(argv)
    args.out = args.out or (GARMENT_WEIGHTS if args.garment_side else WEIGHTS)

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    train_set, test_set = FashionMNIST(args.root, "train"), FashionMNIST(args.root, "test")
    if args.garment_side:
        train_set, test_set = Shrunk(train_set, args.garment_side), Shrunk(test_set, args.garment_side)
    model = train(train_set, args.epochs)
    seconds = time.perf_counter() - start
    scores = evaluate(model, train_set, test_set)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    record = {
        "sha256": sha256_file(args.out),
        **scores,
        "test_images": len(test_set),
        "epochs": args.epochs,
        "garment_side": args.garment_side,
        "seed": SEED,
        "threads": THREADS,
        "train_seconds": round(seconds),
        "torch": torch.__version__,
        "command": shlex.join(
            ["python", "scripts/train_fmnist_classifier.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    record_path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"test accuracy {scores['test_accuracy']:.4f}, train-vs-test FID {scores['train_vs_test_fid']:.4f}, "
        f"{seconds:.0f} s of training"
    )
    print(f"wrote {args.out} and {record_path(args.out).name}")


if __name__ == "__main__":
    main()
