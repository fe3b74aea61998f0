"""What the fine-tuning measurement scripts (finetune-intents.py, finetune-entities.py) share:
their command line's `-- FINETUNE FLAGS`, the prompt/completion JSON Lines they write, and the
`gemma3 finetune` run with its log."""

import json
import subprocess
import time
from pathlib import Path


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """The script's own arguments, and those after `--` (for `gemma3 finetune`)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def write_examples(path: Path, pairs) -> None:
    """(prompt, completion) pairs as `gemma3 finetune`'s JSON Lines."""
    with open(path, "w") as f:
        for prompt, completion in pairs:
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def finetune(gemma3: str, out: Path, extra: list[str]) -> Path:
    """`gemma3 finetune` on OUT/train.jsonl (OUT/val.jsonl held out), its log in
    OUT/finetune.log; prints its summary and time, and returns the adapter's path."""
    adapter = out / "adapter.gguf"
    cmd = [gemma3, "finetune", "--data", str(out / "train.jsonl"), "--val", str(out / "val.jsonl")]
    cmd += ["-o", str(adapter)] + extra
    t0 = time.perf_counter()
    with open(out / "finetune.log", "w") as log:
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=log, text=True)
    print(done.stdout.strip(), f"({time.perf_counter() - t0:.0f} s)")
    return adapter
