#!/usr/bin/env python3
"""A bounded load test of `moe-edge serve` on loopback (standard library only).

    python3 tests/server/load_test.py target/debug/moe-edge [--requests 200] [--concurrency 16]

Packs the chat-capable tiny model (int8 experts) into a temporary directory and serves it with
`--parallel 2`, a short queue and the smallest expert cache (one expert), so that requests queue,
some are refused, and the cache evicts all the time. Then:

1. solo: every distinct request of the mix (chat and text completions, streamed and not, greedy
   and seeded sampling) is sent alone, one at a time: the reference answers;
2. load: `--requests` requests from that mix, `--concurrency` at a time; every answer must be 200
   with the solo answer's text (greedy and seeded requests are deterministic) or a refusal, 429/503
   with an OpenAI-style JSON error, which the client retries after a back-off as OpenAI's client
   does (up to `--retries` times); none may be lost, hang (timeout) or fail otherwise;
3. `/metrics`: the request count adds up, and the expert cache's peak resident bytes never went
   over its budget;
4. SIGTERM: the server exits 0.

Prints p50/p99 latency, aggregate generated tok/s and the refusals; exits non-zero on any failure.
"""
import argparse
import http.client
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import ROOT, chat_model, start_server  # noqa: E402
TIMEOUT_S = 300


def request_mix():
    """The distinct requests: every one deterministic (greedy, or sampled with a seed)."""
    questions = ["What does tar do?", "Name a prime.", "Say hello in German.", "Count to five.",
                 "What is a mixture of experts?", "Describe the sea.", "Why is the sky blue?", "Write a haiku."]
    mix = []
    for i, q in enumerate(questions):
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i}
        for stream in (False, True):
            mix.append(("/v1/chat/completions",
                        dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
                             max_tokens=12 + 2 * i, stream=stream, **sampling)))
            mix.append(("/v1/completions", dict(prompt=q, max_tokens=10 + i, stream=stream, **sampling)))
    return mix


def post(addr, path, body):
    """Returns (status, text, completion tokens, finish reason, error body)."""
    host, port = addr
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        return resp.status, None, 0, None, json.loads(raw)
    if not body.get("stream"):
        v = json.loads(raw)
        c = v["choices"][0]
        text = c["message"]["content"] if "message" in c else c["text"]
        return 200, text, v["usage"]["completion_tokens"], c["finish_reason"], None
    text, finish, tokens, done = "", None, 0, False
    for line in raw.decode().splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        v = json.loads(data)
        if "error" in v:
            return 500, None, 0, None, v
        for c in v["choices"]:
            piece = c.get("delta", {}).get("content") if "delta" in c else c.get("text")
            if piece:
                text += piece
                tokens += 1
            finish = c.get("finish_reason") or finish
        if v.get("timings"):
            tokens = v["timings"]["predicted_n"] + 1
    if not done:
        return 500, None, 0, None, {"error": {"message": "the stream ended without [DONE]"}}
    return 200, text, tokens, finish, None


def metrics(addr):
    conn = http.client.HTTPConnection(*addr, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=str(ROOT / "target/debug/moe-edge"))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--queue", type=int, default=6)
    ap.add_argument("--retries", type=int, default=40)
    args = ap.parse_args()
    runner = os.environ.get("MOE_EDGE_TEST_RUNNER", "").split()
    failures = []

    with tempfile.TemporaryDirectory() as tmp:
        src, packed = pathlib.Path(tmp) / "src", pathlib.Path(tmp) / "packed"
        src.mkdir()
        chat_model(src)
        subprocess.run(runner + [args.binary, "pack", str(src), "-o", str(packed), "--experts", "int8"],
                       check=True, stdout=subprocess.DEVNULL)
        server, url = start_server(runner + [args.binary, "serve", "-m", str(packed), "--addr", "127.0.0.1:0",
                                             "--model-name", "tiny", "--parallel", str(args.parallel),
                                             "--queue", str(args.queue), "--expert-cache-mb", "0"])
        try:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            addr = (host, int(port))

            mix = request_mix()
            solo = []
            for path, body in mix:
                status, text, _, _, err = post(addr, path, body)
                if status != 200:
                    failures.append(f"solo {path} {body}: HTTP {status} {err}")
                solo.append(text)

            results = [None] * args.requests
            next_index = iter(range(args.requests))
            lock = threading.Lock()

            def client():
                while True:
                    with lock:
                        i = next(next_index, None)
                    if i is None:
                        return
                    path, body = mix[i % len(mix)]
                    start = time.monotonic()
                    refusals = []
                    for attempt in range(args.retries + 1):
                        try:
                            outcome = post(addr, path, body)
                        except Exception as e:  # a timeout or a broken connection: lost
                            outcome = (None, None, 0, None, {"error": {"message": repr(e)}})
                        if outcome[0] not in (429, 503) or attempt == args.retries:
                            break
                        refusals.append(outcome)
                        time.sleep(min(0.02 * 2 ** attempt, 0.5))
                    results[i] = (outcome, time.monotonic() - start, refusals)

            before = metrics(addr)
            wall = time.monotonic()
            threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - wall
            after = metrics(addr)

            latencies, tokens, refused, retried = [], 0, {}, 0
            for i, r in enumerate(results):
                path, body = mix[i % len(mix)]
                if r is None:
                    failures.append(f"request {i}: no outcome (lost)")
                    continue
                (status, text, n, finish, err), seconds, refusals = r
                for (rs, _, _, _, rerr) in refusals:
                    retried += 1
                    if not rerr.get("error", {}).get("message"):
                        failures.append(f"request {i}: a {rs} refusal without an OpenAI-style error: {rerr}")
                if status == 200:
                    latencies.append(seconds)
                    tokens += n
                    if text != solo[i % len(mix)]:
                        failures.append(f"request {i} ({path}, stream={body['stream']}): {text!r} differs from "
                                        f"the solo answer {solo[i % len(mix)]!r}")
                elif status in (429, 503) and isinstance(err, dict) and err.get("error", {}).get("message"):
                    refused[status] = refused.get(status, 0) + 1
                else:
                    failures.append(f"request {i} ({path}): status {status}, {err}")

            counted = after["moe_edge_requests_total"] - before["moe_edge_requests_total"]
            sent = args.requests + retried
            if counted != sent:
                failures.append(f"/metrics counted {counted} requests, {sent} were sent")
            peak, budget = after["moe_edge_expert_cache_peak_resident_bytes"], after["moe_edge_expert_cache_budget_bytes"]
            if peak > budget:
                failures.append(f"expert cache peak {peak} bytes over its budget {budget}")
            misses = after["moe_edge_expert_cache_misses_total"] - before["moe_edge_expert_cache_misses_total"]
            if latencies:
                q = statistics.quantiles(latencies, n=100, method="inclusive")
                print(f"{args.requests} requests, {args.concurrency} concurrent, --parallel {args.parallel} "
                      f"--queue {args.queue}: {len(latencies)} answered, {retried} refusals (429) retried, "
                      f"finally refused {refused or 'none'}; "
                      f"latency p50 {statistics.median(latencies) * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms; "
                      f"{tokens} tokens generated in {wall:.1f} s = {tokens / wall:.1f} tok/s aggregate; "
                      f"expert cache: peak {peak:.0f} of {budget:.0f} bytes, {misses:.0f} misses")
            if not latencies:
                failures.append("no request was answered")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = "hung"
            if code != 0:
                failures.append(f"the server exited with {code} on SIGTERM")

    for f in failures[:20]:
        print("FAIL", f)
    print(f"{len(failures)} failures" if failures else "load test passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
