#!/usr/bin/env python3
"""moe-edge next to its peers on the same model, threads and token counts, in interleaved rounds
(one run of every engine per round, so that the machine's drift hits all of them alike).

    tools/.venv/bin/python tools/bench_peers.py --model models/bench/small --threads 1,2 --rounds 3

Engines: moe-edge with int8 experts (a pack made by `moe-edge pack`), moe-edge with f32 experts
(the unpacked ONNX file), tract running the exported graph literally (`moe-edge bench --literal`),
and onnxruntime with its own KV-cache loop (tools/ort_bench.py). Prints a Markdown table of
medians (min-max over rounds) and the ratios moe-edge int8 / peer; `--json` writes every run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory with model.onnx (form-A KV-cache export)")
    ap.add_argument("--pack", default=None, help="int8 pack of the model (default: MODEL-int8, made if missing)")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "moe-edge"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--engines", default="moe-edge-int8,moe-edge-f32,onnxruntime,tract-literal")
    ap.add_argument("--json", default=None, help="write all runs to this file")
    args = ap.parse_args()

    model = args.model.rstrip("/")
    pack = args.pack or model + "-int8"
    if "moe-edge-int8" in args.engines and not os.path.isdir(pack):
        subprocess.run([args.binary, "pack", model, "-o", pack], check=True)
    common = ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--repeat", "1", "--json"]
    engines = {
        "moe-edge-int8": lambda t: [args.binary, "--threads", str(t), "bench", "-m", pack, *common],
        "moe-edge-f32": lambda t: [args.binary, "--threads", str(t), "bench", "-m", model, *common],
        "tract-literal": lambda t: [args.binary, "--threads", str(t), "bench", "-m", model, "--literal", *common],
        "onnxruntime": lambda t: [sys.executable, os.path.join(HERE, "ort_bench.py"), "--model", os.path.join(model, "model.onnx"), "--threads", str(t),
                                  "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--repeat", "1"],
    }
    names = [e for e in args.engines.split(",") if e]
    runs = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for rnd in range(args.rounds):
            for name in names:
                r = run_json(engines[name](threads))
                r.update(engine_name=name, round=rnd, threads=threads)
                runs.append(r)
                print(f"round {rnd} threads {threads} {name}: prefill {r['prefill_tokens_per_s']:.1f} decode {r['decode_tokens_per_s']:.1f}", file=sys.stderr)
    if args.json:
        json.dump(runs, open(args.json, "w"), indent=1)

    def stats(name, threads, key):
        v = [r[key] for r in runs if r["engine_name"] == name and r["threads"] == threads]
        return statistics.median(v), min(v), max(v)

    print(f"\nModel {model}, prompt {args.prompt_tokens}, generate {args.gen_tokens}, {args.rounds} interleaved rounds; median (min-max).\n")
    print("| threads | engine | load s | prefill tok/s | decode tok/s | peak RSS MB | int8 / engine (prefill, decode) |")
    print("|---|---|---|---|---|---|---|")
    for threads in sorted({r["threads"] for r in runs}):
        base = {k: stats("moe-edge-int8", threads, k)[0] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")} if "moe-edge-int8" in names else None
        for name in names:
            p, pmin, pmax = stats(name, threads, "prefill_tokens_per_s")
            d, dmin, dmax = stats(name, threads, "decode_tokens_per_s")
            load = stats(name, threads, "load_s")[0]
            rss = stats(name, threads, "peak_rss_bytes")[0] / 1e6
            ratio = f"{base['prefill_tokens_per_s'] / p:.2f}x, {base['decode_tokens_per_s'] / d:.2f}x" if base else ""
            print(f"| {threads} | {name} | {load:.1f} | {p:.1f} ({pmin:.1f}-{pmax:.1f}) | {d:.1f} ({dmin:.1f}-{dmax:.1f}) | {rss:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
