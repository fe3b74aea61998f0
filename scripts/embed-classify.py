#!/usr/bin/env python3
"""Intent routing with embeddings and no training: each label's mean vector (its centroid) from
a training part, then every held-out text takes the label of the nearest centroid (cosine).
A baseline for what the base model's embeddings do before any fine-tuning.

    python3 scripts/embed-classify.py DATA.csv [--pooling mean] [--holdout 0.2] [--seed 0]

DATA.csv has `text,category` columns (banking77's train.csv: ../shared/datasets/banking77).
The vectors come from `gemma3 embed` (unit length); numpy only.
"""

import argparse
import csv
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--pooling", default="mean")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gemma3", default=str(ROOT / "target/release/gemma3"))
    a = ap.parse_args()
    rows = [(r["text"].replace("\n", " ").strip(), r["category"]) for r in csv.DictReader(open(a.data))]
    rows = [r for r in rows if r[0]]
    random.Random(a.seed).shuffle(rows)
    cut = int(len(rows) * (1 - a.holdout))
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(t for t, _ in rows) + "\n")
        f.flush()
        t0 = time.perf_counter()
        out = subprocess.run(
            [a.gemma3, "embed", "--pooling", a.pooling, "-f", f.name],
            check=True, capture_output=True, text=True,
        ).stdout
        seconds = time.perf_counter() - t0
    x = np.array([[float(v) for v in line[1:-1].split(",")] for line in out.splitlines()])
    labels = sorted({c for _, c in rows})
    y = np.array([labels.index(c) for _, c in rows])
    centroids = np.stack([x[:cut][y[:cut] == k].mean(axis=0) for k in range(len(labels))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    guess = (x[cut:] @ centroids.T).argmax(axis=1)
    acc = float((guess == y[cut:]).mean())
    print(
        f"{len(labels)} labels, {cut} training texts, {len(rows) - cut} held out, pooling {a.pooling}: "
        f"nearest-centroid accuracy {acc:.4f} (chance {1 / len(labels):.4f}); "
        f"embedding {len(rows)} texts took {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
