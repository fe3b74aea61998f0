#!/usr/bin/env python3
"""Fine-tune the model for intent routing and measure it: a seeded split of a labelled CSV
(`text,category`, as banking77's train.csv) into training, held-out and test texts; `gemma3
finetune` on the training ones (prompt/completion JSON Lines, the held-out ones as --val); then
`gemma3 classify` on the test texts with and without the adapter, and each one's accuracy.

    python3 scripts/finetune-intents.py ../shared/datasets/banking77/train.csv OUT_DIR \\
        [--train 2000] [--val 200] [--test 500] [--seed 1] [--skip-base] [-- FINETUNE FLAGS...]

The prompt is PROMPT below, the completion the category's name after a space, and `classify` is
given the same prompt as its template and every category as a label: the fine-tuned model is
asked what it was taught. OUT_DIR keeps the data, the adapter (adapter.gguf), the logs and the
predictions. Flags after `--` go to `gemma3 finetune` (e.g. `-- --lr 5e-4 --warmup 10`).
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path
import random

from finetune_common import finetune, split_flags, write_examples

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Classify the intent of this bank customer's message.\nMessage: {text}\nIntent:"


def main() -> None:
    argv, extra = split_flags(sys.argv[1:])
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gemma3", default=str(ROOT / "target/release/gemma3"))
    ap.add_argument("--skip-base", action="store_true", help="classify with the adapter only")
    a = ap.parse_args(argv)

    rows = [r for r in csv.DictReader(open(a.csv, newline="")) if r["text"].strip()]
    random.Random(a.seed).shuffle(rows)
    need = a.train + a.val + a.test
    if len(rows) < need:
        sys.exit(f"{a.csv}: {len(rows)} texts, {need} asked for")
    test = rows[: a.test]
    val = rows[a.test : a.test + a.val]
    train = rows[a.test + a.val : need]
    labels = sorted({r["category"] for r in rows})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = lambda r: r["text"].replace("\n", " ").strip()
    for name, part in [("train", train), ("val", val)]:
        pairs = ((PROMPT.format(text=text(r)), " " + r["category"]) for r in part)
        write_examples(out / f"{name}.jsonl", pairs)
    (out / "test.txt").write_text("".join(text(r) + "\n" for r in test))
    print(f"{len(train)} training, {len(val)} held-out, {len(test)} test texts; {len(labels)} labels")

    adapter = finetune(a.gemma3, out, extra)

    gold = [r["category"] for r in test]
    runs = [("base model", []), ("fine-tuned", ["--lora", str(adapter)])]
    for name, lora in runs[1:] if a.skip_base else runs:
        cmd = [a.gemma3, "classify", "--template", PROMPT, "-f", str(out / "test.txt")] + lora
        for c in labels:
            cmd += ["-l", " " + c]
        t0 = time.perf_counter()
        got = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split("\n")
        secs = time.perf_counter() - t0
        got = [g.strip() for g in got if g.strip()]
        (out / f"{name.split()[0]}.pred").write_text("\n".join(got) + "\n")
        right = sum(g == c for g, c in zip(got, gold))
        print(f"{name}: {right}/{len(gold)} right ({right / len(gold):.1%}; chance {1 / len(labels):.1%}), {secs:.0f} s")


if __name__ == "__main__":
    main()
