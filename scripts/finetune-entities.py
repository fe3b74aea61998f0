#!/usr/bin/env python3
"""Fine-tune the model for entity extraction and measure it: WNUT-17's CoNLL files (a token and
its BIO tag a line, a blank line between sentences) turned into prompt/completion JSON Lines,
`gemma3 finetune` on the training sentences (a seeded few held out as --val), then `gemma3 serve`
with the adapter answering the test sentences, with and without it, and each run's entity F1.

    python3 scripts/finetune-entities.py ../shared/datasets/wnut17 OUT_DIR \\
        [--train 0 (all)] [--val 100] [--test 0 (all of dev.conll)] [--seed 1] [--skip-base] \\
        [-- FINETUNE FLAGS...]

The prompt is PROMPT below; the completion lists the sentence's entities in order as
` type: words; type: words`, or ` none`. The base model is asked the same with SHOTS training
sentences and their answers before it (all but one with entities) (it was not taught the form). The test sentences are
dev.conll's: WNUT-17's test split is not on this machine. Scoring is exact-match of (type, words)
pairs, case-insensitive, counted as multisets per sentence (the shared task's "entity" F1 on
surface forms, micro-averaged); a malformed part of a reply counts as a wrong entity.
Flags after `--` go to `gemma3 finetune` (e.g. `-- --lr 5e-4 --warmup 30`).
"""

import argparse
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finetune_common import finetune, split_flags, write_examples

ROOT = Path(__file__).resolve().parent.parent
PROMPT = (
    "List the named entities in the text as type: words, separated by semicolons, or none. "
    "Types: person, location, group, corporation, product, creative-work.\n"
    "Text: {text}\nEntities:"
)
SHOTS = 6


def sentences(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """Each sentence's text (tokens joined by spaces) and its entities, (type, words), in order."""
    out, words, tags = [], [], []
    for line in list(open(path, encoding="utf-8")) + [""]:
        line = line.rstrip("\n")
        if not line.strip():
            if words:
                out.append((" ".join(words), spans(words, tags)))
            words, tags = [], []
            continue
        word, tag = line.rsplit("\t", 1)
        words.append(word)
        tags.append(tag)
    return out


def spans(words: list[str], tags: list[str]) -> list[tuple[str, str]]:
    out, cur, kind = [], [], None
    for w, t in zip(words + [""], tags + ["O"]):
        if cur and not (t.startswith("I-") and t[2:] == kind):
            out.append((kind, " ".join(cur)))
            cur, kind = [], None
        if t.startswith("B-") or (t.startswith("I-") and not cur):
            cur, kind = [w], t[2:]
        elif t.startswith("I-"):
            cur.append(w)
    return out


def answer(ents: list[tuple[str, str]]) -> str:
    return " " + ("; ".join(f"{k}: {w}" for k, w in ents) if ents else "none")


def parse(reply: str) -> list[tuple[str, str]]:
    """A reply's (type, words) pairs; a part that is not `type: words` is kept as ('?', part)."""
    reply = reply.strip()
    if reply.lower() == "none" or not reply:
        return []
    out = []
    for part in reply.split(";"):
        kind, sep, words = part.partition(":")
        out.append((kind.strip().lower(), words.strip().lower()) if sep else ("?", part.strip()))
    return out


def score(gold: list[list[tuple[str, str]]], pred: list[list[tuple[str, str]]]) -> tuple[int, int, int]:
    right = n_pred = n_gold = 0
    for g, p in zip(gold, pred):
        g = Counter((k, w.lower()) for k, w in g)
        p = Counter(p)
        right += sum((g & p).values())
        n_pred += sum(p.values())
        n_gold += sum(g.values())
    return right, n_pred, n_gold


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main() -> None:
    argv, extra = split_flags(sys.argv[1:])
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="a folder with train.conll and dev.conll")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=0, help="training sentences (0: all)")
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=0, help="test sentences from dev.conll (0: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--gemma3", default=str(ROOT / "target/release/gemma3"))
    ap.add_argument("--skip-base", action="store_true", help="score the adapter only")
    ap.add_argument("--skip-train", action="store_true", help="score OUT_DIR's adapter.gguf as it is")
    a = ap.parse_args(argv)

    data = Path(a.data)
    train = sentences(data / "train.conll")
    test = sentences(data / "dev.conll")
    random.Random(a.seed).shuffle(train)
    val, train = train[: a.val], train[a.val :]
    if a.train:
        train = train[: a.train]
    if a.test:
        test = test[: a.test]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in [("train", train), ("val", val)]:
        write_examples(out / f"{name}.jsonl", ((PROMPT.format(text=t), answer(e)) for t, e in part))
    with_ents = sum(bool(e) for _, e in train)
    print(f"{len(train)} training sentences ({with_ents} with entities), {len(val)} held out, "
          f"{len(test)} test sentences with {sum(len(e) for _, e in test)} entities")

    adapter = out / "adapter.gguf" if a.skip_train else finetune(a.gemma3, out, extra)

    # The examples: the first training sentences with entities, and one without.
    shots = [x for x in train if x[1]][: SHOTS - 1] + [next(x for x in train if not x[1])]
    shots = "".join(PROMPT.format(text=t) + answer(e) + "\n\n" for t, e in shots)
    serve = [a.gemma3, "serve", "--port", str(a.port), "--parallel", "8", "--ctx", "1024"]
    serve += ["--lora", str(adapter), "--lora-init-without-apply"]
    log = open(out / "serve.log", "w")
    server = subprocess.Popen(serve, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"gemma3 serve ended: see {out / 'serve.log'}")
                time.sleep(0.2)
        runs = [
            (f"base model, {SHOTS} examples in the prompt", shots, 0.0),
            ("fine-tuned", "", 1.0),
        ]
        gold = [e for _, e in test]
        for name, before, scale in runs[1:] if a.skip_base else runs:
            def ask(text: str) -> str:
                body = {
                    "prompt": before + PROMPT.format(text=text),
                    "max_tokens": 64,
                    "temperature": 0,
                    "stop": ["\n"],
                    "lora": [{"id": 0, "scale": scale}],
                }
                return post(a.port, body)["choices"][0]["text"]

            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(ask, [t for t, _ in test]))
            secs = time.perf_counter() - t0
            stem = name.split()[0].rstrip(",")
            (out / f"{stem}.pred").write_text("".join(json.dumps(r) + "\n" for r in replies))
            right, n_pred, n_gold = score(gold, [parse(r) for r in replies])
            p = right / n_pred if n_pred else 0.0
            r = right / n_gold if n_gold else 0.0
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            exact = sum(Counter(parse(x)) == Counter((k, w.lower()) for k, w in g)
                        for x, g in zip(replies, gold))
            print(f"{name}: F1 {f1:.1%} (precision {p:.1%}, recall {r:.1%}; {right} right of "
                  f"{n_pred} given, {n_gold} in the texts); {exact}/{len(test)} sentences exactly; "
                  f"{secs:.0f} s")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
