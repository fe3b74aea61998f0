#!/usr/bin/env python3
"""Intent-routing examples for `gemma3 finetune` and `gemma3 classify` from a labeled CSV
(`text,category`, as banking77's train.csv): a seeded split into training, held-out (for
finetune's --val) and test sets, written as JSON Lines of {"prompt", "completion"}, plus the
test texts alone and their labels for `classify`.

    scripts/intent_data.py ../shared/datasets/banking77/train.csv OUT_DIR --train 2000 --val 200 --test 500

The prompt is the one `classify --template` is given (PROMPT below, printed to OUT_DIR/template);
the completion is the label with a space before it, as `classify --label` scores it.
"""
import argparse, csv, json, os, random

PROMPT = "Classify the intent of this bank customer's message.\nMessage: {text}\nIntent:"

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("out")
ap.add_argument("--train", type=int, default=2000)
ap.add_argument("--val", type=int, default=200)
ap.add_argument("--test", type=int, default=500)
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()

rows = list(csv.DictReader(open(a.csv, newline="")))
random.Random(a.seed).shuffle(rows)
need = a.train + a.val + a.test
assert len(rows) >= need, f"{len(rows)} rows, {need} asked for"
test, val, train = rows[: a.test], rows[a.test : a.test + a.val], rows[a.test + a.val : need]
os.makedirs(a.out, exist_ok=True)

def jsonl(name, part):
    with open(os.path.join(a.out, name), "w") as f:
        for r in part:
            ex = {"prompt": PROMPT.format(text=r["text"].strip()), "completion": " " + r["category"]}
            f.write(json.dumps(ex) + "\n")

jsonl("train.jsonl", train)
jsonl("val.jsonl", val)
jsonl("test.jsonl", test)
with open(os.path.join(a.out, "test_texts.txt"), "w") as f:
    f.writelines(r["text"].strip().replace("\n", " ") + "\n" for r in test)
with open(os.path.join(a.out, "test_labels.txt"), "w") as f:
    f.writelines(r["category"] + "\n" for r in test)
with open(os.path.join(a.out, "labels.txt"), "w") as f:
    f.writelines(c + "\n" for c in sorted({r["category"] for r in rows}))
with open(os.path.join(a.out, "template"), "w") as f:
    f.write(PROMPT.replace("{text}", "{text}"))
print(f"{len(train)} train, {len(val)} held out, {len(test)} test, {len({r['category'] for r in rows})} labels in {a.out}")
