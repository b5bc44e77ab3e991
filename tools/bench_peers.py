#!/usr/bin/env python3
"""moe-edge next to its peers on the same model, threads and token counts, in interleaved rounds
(one run of every engine per round, so that the machine's drift hits all of them alike).

    tools/.venv/bin/python tools/bench_peers.py --model models/bench/small --threads 1,2 --rounds 3

Engines: moe-edge with int8 experts (a pack made by `moe-edge pack`), moe-edge with f32 experts
(the unpacked ONNX file), tract running the exported graph literally (`moe-edge bench --literal`),
onnxruntime with its own KV-cache loop (tools/ort_bench.py), and llama.cpp's `llama-bench` on GGUF
files of the same checkpoint (`--gguf Q8_0=FILE,Q4_0=FILE --llama-bench PATH`; engines
`llama.cpp-Q8_0` ...). Prints a Markdown table of medians (min-max over rounds) and the ratios
moe-edge int8 / peer; `--json` writes every run.

llama-bench measures prompt processing (`-p`) and generation (`-n`) as separate tests, generation
from an empty context; moe-edge bench decodes after its prompt. llama-bench reports no load time.
Peak RSS is the child process's (wait4).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llama_bench(cmd):
    """One llama-bench run (-o json, -r 1) as moe-edge bench's keys, with the child's peak RSS."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read()[-2000:].decode(errors='replace')}")
    tests = json.loads(stdout)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return dict(prefill_tokens_per_s=pp, decode_tokens_per_s=tg, load_s=float("nan"), peak_rss_bytes=usage.ru_maxrss * 1024)


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
    ap.add_argument("--gguf", default="", help="llama.cpp files of the same checkpoint: NAME=FILE,... (engines llama.cpp-NAME)")
    ap.add_argument("--llama-bench", default="llama-bench", help="llama.cpp's llama-bench binary")
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
    for spec in filter(None, args.gguf.split(",")):
        quant, path = spec.split("=", 1)
        engines[f"llama.cpp-{quant}"] = lambda t, path=path: [args.llama_bench, "-m", path, "-t", str(t), "-p", str(args.prompt_tokens),
                                                              "-n", str(args.gen_tokens), "-r", "1", "-o", "json"]
    names = [e for e in args.engines.split(",") if e]
    names += [e for e in engines if e.startswith("llama.cpp-") and e not in names]
    runs = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for rnd in range(args.rounds):
            for name in names:
                cmd = engines[name](threads)
                r = run_llama_bench(cmd) if name.startswith("llama.cpp-") else run_json(cmd)
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
