#!/usr/bin/env python3
"""Check `gemma3 serve`'s Ollama routes with the official `ollama` Python client.

Chat and generate, streamed and not (greedy: the streamed text must equal the
non-streamed one, and the OpenAI route's reply to the same request), a JSON
schema in `format`, embeddings (unit length, equal to /v1/embeddings'), the
model listings, and the errors the client raises for bad requests.

    python3 scripts/ollama_client_check.py --host http://127.0.0.1:8080 [--api-key KEY]

scripts/check-openai.sh runs this after the `openai` client's check.
Prints 'N passed, N failed' and exits non-zero on any failure.
"""

import argparse
import json
import math
import sys
import urllib.request

import ollama
from checklib import check, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = ollama.Client(host=args.host, headers=headers, timeout=300)

    def openai_post(path, body):
        req = urllib.request.Request(
            args.host + path, json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
        )
        return json.load(urllib.request.urlopen(req, timeout=300))

    greedy = {"temperature": 0, "num_predict": 24}
    messages = [{"role": "user", "content": "Name three colours."}]

    def listings():
        models = client.list().models
        assert len(models) == 1, models
        # The file's own type (general.file_type 15), as Ollama names it.
        assert models[0].details.quantization_level == "Q4_K_M", models[0].details
        assert models[0].details.family == "gemma3", models[0].details
        assert models[0].size > 200_000_000, models[0].size
        shown = client.show(models[0].model)
        assert shown.details.family == "gemma3" and "completion" in shown.capabilities, shown
        running = client.ps().models
        assert len(running) == 1 and running[0].model == models[0].model, running

    def chat():
        r = client.chat(model="gemma3", messages=messages, options=greedy)
        assert r.done and r.done_reason == "length" and r.eval_count == 24, r
        assert r.message.role == "assistant" and r.message.content, r
        assert r.prompt_eval_count > 0 and r.total_duration > 0, r
        parts = list(client.chat(model="gemma3", messages=messages, options=greedy, stream=True))
        assert all(not p.done for p in parts[:-1]) and parts[-1].done, parts[-1]
        assert "".join(p.message.content for p in parts) == r.message.content
        o = openai_post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 24})
        assert o["choices"][0]["message"]["content"] == r.message.content, (o, r.message.content)

    def generate():
        prompt = "The capital of France is"
        r = client.generate(model="gemma3", prompt=prompt, raw=True, options={"temperature": 0, "num_predict": 12})
        parts = list(
            client.generate(model="gemma3", prompt=prompt, raw=True, options={"temperature": 0, "num_predict": 12}, stream=True)
        )
        assert "".join(p.response for p in parts) == r.response, (parts, r.response)
        o = openai_post("/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 12})
        assert o["choices"][0]["text"] == r.response, (o, r.response)
        # Without raw, the prompt is a user turn: the same as a chat of it.
        t = client.generate(model="gemma3", prompt="Name three colours.", options=greedy)
        c = client.chat(model="gemma3", messages=messages, options=greedy)
        assert t.response == c.message.content, (t.response, c.message.content)
        # An empty prompt loads the model and generates nothing.
        e = client.generate(model="gemma3", prompt="")
        assert e.done and e.done_reason == "load" and e.response == "", e

    def structured():
        schema = {
            "type": "object",
            "properties": {"intent": {"enum": ["balance", "transfer", "card_lost"]}},
            "required": ["intent"],
        }
        ask = [{"role": "user", "content": "Classify the banking intent: I lost my card."}]
        r = client.chat(model="gemma3", messages=ask, format=schema, options={"temperature": 0, "num_predict": 40})
        reply = json.loads(r.message.content)
        assert reply["intent"] in schema["properties"]["intent"]["enum"] and len(reply) == 1, reply
        assert r.done_reason == "stop", r

    def embed():
        texts = ["I lost my card.", "What is my balance?"]
        r = client.embed(model="gemma3", input=texts)
        assert len(r.embeddings) == 2 and all(len(v) == 640 for v in r.embeddings), len(r.embeddings)
        for v in r.embeddings:
            assert abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-5
        o = openai_post("/v1/embeddings", {"input": texts})
        for v, d in zip(r.embeddings, o["data"]):
            assert max(abs(a - b) for a, b in zip(v, d["embedding"])) < 1e-6
        assert r.prompt_eval_count == o["usage"]["prompt_tokens"], (r.prompt_eval_count, o["usage"])

    def errors():
        for options, field in [({"temperature": 1e9}, "temperature"), ({"mirostat": 2}, "mirostat")]:
            try:
                client.chat(model="gemma3", messages=messages, options=options)
            except ollama.ResponseError as e:
                assert e.status_code == 400, e.status_code
                assert f"options.{field}" in e.error, e.error
            else:
                raise AssertionError(f"no error for {options}")
        # Options it does not know are left out, as Ollama leaves them.
        r = client.chat(model="gemma3", messages=messages, options={**greedy, "bogus": 1, "num_ctx": 8192})
        assert r.done, r
        # A route it does not serve: the error as Ollama's clients read it.
        try:
            client.pull("llama3")
        except ollama.ResponseError as e:
            assert e.status_code == 404 and isinstance(e.error, str), (e.status_code, e.error)
        else:
            raise AssertionError("pull did not fail")

    check("listings (list, show, ps)", listings)
    check("chat (stream = not, = OpenAI route)", chat)
    check("generate (raw, templated, load)", generate)
    check("format: a JSON schema", structured)
    check("embed (unit length, = /v1/embeddings)", embed)
    check("errors (400 for bad options, 404 in Ollama's shape)", errors)
    sys.exit(summary())


if __name__ == "__main__":
    main()
