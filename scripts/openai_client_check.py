#!/usr/bin/env python3
"""Check `gemma3 serve` with the official `openai` Python client.

Chat and completions, streamed and not (greedy: the streamed text must equal
the non-streamed one), logprobs, stop strings, usage, and the errors the
client raises for bad requests (400 naming the field, 401, 404).

    python3 scripts/openai_client_check.py --base-url http://127.0.0.1:8080/v1 [--api-key KEY]

scripts/check-openai.sh starts a server on a free port and runs this.
Prints 'N passed, N failed' and exits non-zero on any failure.
"""

import argparse
import json
import sys

import openai
from checklib import check, summary


def expect_error(exc_type, status, param, fn):
    try:
        fn()
    except exc_type as e:
        assert e.status_code == status, f"status {e.status_code}, expected {status}"
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body)  # openai >= 1 hands over the inner object
        assert isinstance(err, dict) and err.get("message"), f"no error message in {e.body!r}"
        if param is not None:
            assert err.get("param") == param, f"param {err.get('param')!r}, expected {param!r}"
        return
    raise AssertionError(f"no {exc_type.__name__} raised")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."},
    ]
    greedy = dict(model=model, temperature=0, max_tokens=24)

    def chat():
        r = client.chat.completions.create(messages=messages, **greedy)
        c = r.choices[0]
        assert r.object == "chat.completion"
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length"), c.finish_reason
        u = r.usage
        assert u.prompt_tokens > 0 and u.completion_tokens > 0
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        return c.message.content

    def chat_stream():
        text = chat()
        parts, finish, usage = [], None, None
        stream = client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **greedy
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    parts.append(c.delta.content)
                finish = c.finish_reason or finish
        assert "".join(parts) == text, f"{''.join(parts)!r} != {text!r}"
        assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0

    def chat_cached():
        client.chat.completions.create(messages=messages, **greedy)
        r = client.chat.completions.create(messages=messages, **greedy)
        details = r.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens > 0, r.usage

    def chat_parts_and_logprobs():
        r = client.chat.completions.create(
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}],
            logprobs=True,
            top_logprobs=3,
            **dict(greedy, max_tokens=4),
        )
        lp = r.choices[0].logprobs.content
        assert len(lp) == r.usage.completion_tokens
        for t in lp:
            assert len(t.top_logprobs) == 3 and t.logprob <= 0
            assert t.top_logprobs[0].token == t.token  # greedy takes the most likely

    def completion():
        r = client.completions.create(prompt="The capital of France is", **dict(greedy, max_tokens=12))
        c = r.choices[0]
        assert r.object == "text_completion" and c.finish_reason in ("stop", "length")
        s = "".join(
            ch.choices[0].text
            for ch in client.completions.create(
                prompt="The capital of France is", stream=True, **dict(greedy, max_tokens=12)
            )
            if ch.choices
        )
        assert s == c.text, f"{s!r} != {c.text!r}"
        e = client.completions.create(prompt="The capital of France is", echo=True, **dict(greedy, max_tokens=12))
        assert e.choices[0].text == "The capital of France is" + c.text
        lp = client.completions.create(prompt="The capital of France is", logprobs=2, **dict(greedy, max_tokens=12))
        assert len(lp.choices[0].logprobs.tokens) == lp.usage.completion_tokens

    def stop_string():
        full = client.completions.create(prompt="1, 2, 3, 4,", **dict(greedy, max_tokens=12)).choices[0].text
        r = client.completions.create(prompt="1, 2, 3, 4,", stop=["7"], **dict(greedy, max_tokens=12))
        if "7" in full:
            assert r.choices[0].text == full[: full.index("7")] and r.choices[0].finish_reason == "stop"

    def embeddings():
        # The client asks for base64 unless told otherwise, and decodes it.
        texts = ["I want to transfer money", "Book a table for two", "I want to transfer money"]
        r = client.embeddings.create(model=model, input=texts)
        v = [d.embedding for d in r.data]
        assert [d.index for d in r.data] == [0, 1, 2] and all(len(x) == 640 for x in v)
        assert abs(sum(x * x for x in v[0]) - 1.0) < 1e-5, "unit length"
        assert v[0] == v[2] and v[0] != v[1]
        f = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
        assert all(abs(a - b) < 1e-6 for a, b in zip(f.data[0].embedding, v[0]))
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens

    def structured_output():
        # The client's response_format forms: a JSON schema (as
        # `client.beta.chat.completions.parse` and strict mode send it), and
        # any JSON object; the reply parses and obeys the schema.
        schema = {
            "type": "object",
            "properties": {"intent": {"enum": ["balance", "transfer", "card_lost"]}},
            "required": ["intent"],
            "additionalProperties": False,
        }
        ask = [{"role": "user", "content": "Classify the banking intent: I lost my card."}]
        r = client.chat.completions.create(
            model=model, messages=ask, temperature=0, max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "intent", "strict": True, "schema": schema}},
        )
        reply = json.loads(r.choices[0].message.content)
        assert reply["intent"] in schema["properties"]["intent"]["enum"] and len(reply) == 1, reply
        assert r.choices[0].finish_reason == "stop"
        r = client.chat.completions.create(
            model=model, messages=ask, temperature=0, max_tokens=60, response_format={"type": "json_object"}
        )
        text = r.choices[0].message.content
        assert text.lstrip().startswith("{"), text
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text

    check("models", lambda: client.models.list())
    check("chat", chat)
    check("chat stream = chat", chat_stream)
    check("chat prefix cache", chat_cached)
    check("chat content parts + logprobs", chat_parts_and_logprobs)
    check("completions (stream, echo, logprobs)", completion)
    check("stop string", stop_string)
    check("embeddings (base64 and float)", embeddings)
    check("structured output (json_schema, json_object)", structured_output)

    def n_choices():
        # n choices, as the client reads them, streamed and not: the
        # streamed deltas of each index add up to that choice's reply.
        kw = dict(model=model, messages=messages, max_tokens=12, temperature=1.0, seed=3, n=3)
        r = client.chat.completions.create(**kw)
        assert [c.index for c in r.choices] == [0, 1, 2], r.choices
        texts = [c.message.content for c in r.choices]
        parts = ["", "", ""]
        for chunk in client.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                parts[c.index] += c.delta.content or ""
        assert parts == texts, (parts, texts)
        one = client.chat.completions.create(**{**kw, "n": 1})
        assert one.choices[0].message.content == texts[0], (one.choices[0].message.content, texts)
        assert r.usage.prompt_tokens == one.usage.prompt_tokens, (r.usage, one.usage)

    check("n choices (stream and not)", n_choices)

    def prompt_scores():
        # What lm-evaluation-harness's local-completions asks for a
        # log-likelihood: the prompt's tokens scored, one token generated.
        ids = [2, 818, 5279, 529, 7001, 563]
        r = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None, lp
        assert all(x < 0 for x in lp.token_logprobs[1:]), lp.token_logprobs
        r0 = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=0)
        assert r0.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1], r0
        assert r0.usage.completion_tokens == 0, r0.usage

    check("echo + logprobs: the prompt scored", prompt_scores)

    bad = openai.BadRequestError
    check("400 temperature", lambda: expect_error(bad, 400, "temperature", lambda: client.chat.completions.create(model=model, messages=messages, temperature=1e9)))
    check("400 top_p", lambda: expect_error(bad, 400, "top_p", lambda: client.chat.completions.create(model=model, messages=messages, top_p=5)))
    check("400 n", lambda: expect_error(bad, 400, "n", lambda: client.chat.completions.create(model=model, messages=messages, n=0)))
    check("400 max_tokens beyond context", lambda: expect_error(bad, 400, "max_tokens", lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=10**9)))
    check("400 max_tokens 0", lambda: expect_error(bad, 400, "max_tokens", lambda: client.completions.create(model=model, prompt="x", max_tokens=0)))
    check("400 bad role", lambda: expect_error(bad, 400, "messages[0].role", lambda: client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "x"}])))
    check("400 unsatisfiable schema", lambda: expect_error(bad, 400, "response_format", lambda: client.chat.completions.create(model=model, messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}})))
    check("400 empty embedding input", lambda: expect_error(bad, 400, "input", lambda: client.embeddings.create(model=model, input="")))
    check("404 unknown route", lambda: expect_error(openai.NotFoundError, 404, None, lambda: client.get("/nothing", cast_to=object)))
    if args.api_key != "none":
        other = openai.OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0)
        check("401 wrong key", lambda: expect_error(openai.AuthenticationError, 401, None, lambda: other.models.list()))
    check("still serving", chat)

    return summary()


if __name__ == "__main__":
    sys.exit(main())
