#!/usr/bin/env python3
"""onnxruntime on a form-A KV-cache decoder, with its own greedy decode loop: the same measures
and JSON keys as `moe-edge bench --json` (load_s, ttft_s, prefill_tokens_per_s,
decode_tokens_per_s, peak_rss_bytes, threads), for side-by-side runs (tools/bench_peers.py).
"""

import argparse
import json
import resource
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="model.onnx (form A, with past_key_values inputs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    t0 = time.time()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    load_s = time.time() - t0
    inputs = {i.name: i for i in sess.get_inputs()}
    pasts = [n for n in inputs if n.startswith("past_key_values.")]
    shape = inputs[pasts[0]].shape  # [batch, kv_heads, past, head_dim]
    vocab = sess.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 512
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(3, vocab, size=(1, args.prompt_tokens)).astype(np.int64)

    def step(ids, past, total):
        feeds = {"input_ids": ids}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
        feeds.update(past)
        outs = sess.run(None, feeds)
        return outs[0][0, -1], dict(zip(pasts, outs[1:]))

    runs = []
    for _ in range(args.repeat + 1):  # the first run warms up
        past = {n: np.zeros((1, shape[1], 0, shape[3]), np.float32) for n in pasts}
        t = time.time()
        logits, past = step(prompt, past, args.prompt_tokens)
        prefill = time.time() - t
        nxt = int(logits.argmax())
        ttft = time.time() - t
        total = args.prompt_tokens
        t = time.time()
        for _ in range(args.gen_tokens - 1):
            total += 1
            logits, past = step(np.array([[nxt]], np.int64), past, total)
            nxt = int(logits.argmax())
        decode = time.time() - t
        runs.append((ttft, args.prompt_tokens / prefill, (args.gen_tokens - 1) / decode))
    runs = runs[1:]

    def spread(v):
        v = sorted(v)
        return {"median": v[len(v) // 2], "min": v[0], "max": v[-1]}

    ttft, prefill, decode = (spread([r[i] for r in runs]) for i in range(3))
    print(json.dumps({
        "engine": "onnxruntime " + ort.__version__, "model": args.model, "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeat": args.repeat,
        "load_s": load_s, "ttft_s": ttft["median"], "prefill_tokens_per_s": prefill["median"],
        "decode_tokens_per_s": decode["median"], "ttft": ttft, "prefill": prefill, "decode": decode,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
