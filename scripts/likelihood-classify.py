#!/usr/bin/env python3
"""Intent routing by likelihood and no training: `gemma3 classify` gives each text the category
whose name (underscores as spaces, after a space) the model finds likeliest after a prompt.
A baseline for what the base model does zero-shot before any fine-tuning (compare
scripts/embed-classify.py, which needs labelled examples).

    python3 scripts/likelihood-classify.py DATA.csv [--categories a,b,c] [--per 20] [--seed 0]
        [--template 'Customer message: {text}\\nTopic:']

DATA.csv has `text,category` columns (banking77's train.csv: ../shared/datasets/banking77).
Takes --per texts of each category (all categories unless --categories), shuffled with --seed.
"""

import argparse
import csv
import json
import random
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--categories", default=None)
    ap.add_argument("--per", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default="Customer message: {text}\nTopic:")
    ap.add_argument("--gemma3", default=str(ROOT / "target/release/gemma3"))
    a = ap.parse_args()
    by_cat = defaultdict(list)
    for r in csv.DictReader(open(a.data)):
        text = r["text"].replace("\n", " ").strip()
        if text:
            by_cat[r["category"]].append(text)
    cats = a.categories.split(",") if a.categories else sorted(by_cat)
    rng = random.Random(a.seed)
    rows = []
    for c in cats:
        texts = by_cat[c][:]
        rng.shuffle(texts)
        rows += [(t, c) for t in texts[: a.per]]
    rng.shuffle(rows)
    label = {c: " " + c.replace("_", " ") for c in cats}
    back = {v: k for k, v in label.items()}
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(t for t, _ in rows) + "\n")
        f.flush()
        cmd = [a.gemma3, "classify", "--json", "--template", a.template, "-f", f.name]
        for c in cats:
            cmd += ["-l", label[c]]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        secs = time.perf_counter() - t0
    got = [back[json.loads(line)["label"]] for line in out.splitlines()]
    right = sum(g == c for g, (_, c) in zip(got, rows))
    print(
        f"{len(cats)} categories, {len(rows)} texts: {right / len(rows):.1%} right "
        f"(chance {1 / len(cats):.1%}), {secs:.1f} s"
    )


if __name__ == "__main__":
    main()
