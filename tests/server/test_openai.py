#!/usr/bin/env python3
"""`moe-edge serve` driven by the official `openai` Python client: chat and text completions,
streaming and not, usage counts, and an error the client raises as a typed exception.

    python3 tests/server/test_openai.py target/debug/moe-edge

Builds the tiny model of models/ with the chat fixtures' tokenizer and ChatML template in a temporary
directory, starts the server on a free loopback port, runs the checks, stops the server with SIGTERM
(it must exit 0). Prints 'N passed, M failed' and exits non-zero on any failure.
"""
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

import openai

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import ROOT, chat_model, start_server  # noqa: E402


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/debug/moe-edge")
    runner = os.environ.get("MOE_EDGE_TEST_RUNNER", "").split()
    passed, failed = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp)
        chat_model(model)
        server, addr = start_server(runner + [binary, "serve", "-m", str(model), "--addr", "127.0.0.1:0",
                                              "--model-name", "tiny", "--api-key", "k", "--parallel", "2"])
        try:
            client = openai.OpenAI(base_url=addr + "/v1", api_key="k", max_retries=0, timeout=120)
            checks = []

            def check(fn):
                checks.append(fn)
                return fn

            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does tar do?"}]

            @check
            def models_list():
                assert [m.id for m in client.models.list().data] == ["tiny"]

            @check
            def chat_streaming_equals_non_streaming():
                whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
                choice = whole.choices[0]
                assert choice.message.role == "assistant"
                assert whole.usage.completion_tokens <= 10
                assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
                stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                        stream=True, stream_options={"include_usage": True})
                pieces, usage, reasons = [], None, []
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for c in chunk.choices:
                        if c.delta.content:
                            pieces.append(c.delta.content)
                        if c.finish_reason:
                            reasons.append(c.finish_reason)
                assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
                assert reasons == [choice.finish_reason]
                assert usage.completion_tokens == whole.usage.completion_tokens

            @check
            def completions_streaming_equals_non_streaming():
                prompt = "<|im_start|>user\nls<|im_end|>\n<|im_start|>assistant\n"
                whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
                text = "".join(c.choices[0].text for c in client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True) if c.choices)
                assert text == whole.choices[0].text, (text, whole.choices[0].text)
                assert whole.choices[0].finish_reason in ("stop", "length")

            @check
            def seeded_sampling_repeats():
                a = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1.0, seed=7)
                b = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1.0, seed=7)
                assert a.choices[0].message.content == b.choices[0].message.content

            @check
            def errors_are_typed():
                try:
                    client.chat.completions.create(model="other", messages=messages)
                    raise AssertionError("no error for an unknown model")
                except openai.NotFoundError as e:
                    assert e.body["code"] == "model_not_found", e.body
                try:
                    client.chat.completions.create(model="tiny", messages=messages, temperature=-1)
                    raise AssertionError("no error for a negative temperature")
                except openai.BadRequestError as e:
                    assert e.body["code"] == "invalid_temperature", e.body
                bad = openai.OpenAI(base_url=addr + "/v1", api_key="wrong", max_retries=0)
                try:
                    bad.models.list()
                    raise AssertionError("no error for a wrong key")
                except openai.AuthenticationError:
                    pass

            for fn in checks:
                try:
                    fn()
                    passed += 1
                    print(f"ok      {fn.__name__}")
                except Exception as e:  # noqa: BLE001 - report every failing check
                    failed += 1
                    print(f"FAILED  {fn.__name__}: {e!r}")
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
            if code == 0:
                passed += 1
                print("ok      graceful_shutdown_exits_0")
            else:
                failed += 1
                print(f"FAILED  graceful_shutdown_exits_0: exit code {code}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
