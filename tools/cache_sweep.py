#!/usr/bin/env python3
"""Decode speed, memory and disk reads of a packed model at several expert-cache budgets, each
run inside a memory cgroup (tools/memcap) after dropping the model's files from the page cache.

    python3 tools/cache_sweep.py --model models/bench/olmoe-s-int8 --fractions 1,0.5,0.25 --threads 2

For each fraction f of the expert bytes, the cache budget is f x (resident bytes of all experts)
and the cgroup limit is that budget plus the model's footprint without experts (measured first,
with a one-expert cache) plus --margin-mb. Prints a Markdown table and one JSON line per run.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MEMCAP = os.path.join(HERE, "memcap")


def run(binary, model, threads, budget_mb, limit_mb, prompt, gen, repeat, temperature, policy="layer-cycle"):
    files = [os.path.join(model, f) for f in ("experts.bin", "model.onnx.data", "model.onnx") if os.path.exists(os.path.join(model, f))]
    cmd = [sys.executable, MEMCAP, "--limit-mb", str(limit_mb)]
    for f in files:
        cmd += ["--drop", f]
    cmd += ["--", binary, "--threads", str(threads), "bench", "-m", model, "--prompt-tokens", str(prompt),
            "--gen-tokens", str(gen), "--repeat", str(repeat), "--json", "--expert-cache-mb", str(budget_mb),
            "--temperature", str(temperature), "--cache-policy", policy]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"memcap printed nothing: {out.stderr}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="packed model directory")
    ap.add_argument("--binary", default=os.path.join(HERE, "..", "target", "release", "moe-edge"))
    ap.add_argument("--fractions", default="1,0.5,0.25")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--margin-mb", type=int, default=128)
    ap.add_argument("--policies", default="layer-cycle", help="comma-separated cache policies to compare (layer-cycle, lru)")
    ap.add_argument("--temperature", type=float, default=1.0, help="decode sampling temperature (varied tokens route to varied experts)")
    args = ap.parse_args()

    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    # resident bytes of the experts: int8 values + f32 scales (see docs/PACK_FORMAT.md)
    expert_bytes = 0
    for layer in manifest["layers"]:
        s = layer["spec"]
        nb_h, nb_f = -(-s["hidden"] // 32), -(-s["ffn"] // 32)
        per = (2 * s["ffn"] * nb_h + s["hidden"] * nb_f) * 36 if manifest["experts"] == "int8" else 3 * s["hidden"] * s["ffn"] * 4
        expert_bytes += per * s["experts"]
    expert_mb = expert_bytes / 2**20
    base = run(args.binary, args.model, args.threads, 0, 64 * 1024, args.prompt_tokens, args.gen_tokens, 1, args.temperature)
    base_mb = base["peak_rss_bytes"] / 2**20 - base["cache"]["budget_bytes"] / 2**20
    print(f"experts: {expert_mb:.0f} MiB resident; footprint without experts: {base_mb:.0f} MiB", file=sys.stderr)

    rows = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        for policy in args.policies.split(","):
            budget = int(expert_mb * frac)
            limit = int(base_mb + budget + args.margin_mb)
            r = run(args.binary, args.model, args.threads, budget, limit, args.prompt_tokens, args.gen_tokens, args.repeat, args.temperature, policy)
            r.update(fraction=frac, budget_mb=budget, limit_mb=limit, policy=policy)
            print(json.dumps(r), file=sys.stderr)
            rows.append(r)
    print(f"| budget | policy | cgroup limit | decode tok/s | prefill tok/s | cgroup peak | process peak RSS | disk read per token | cache hits / misses | OOM kills |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r.get("cache") or {}
        dec = r.get("decode_tokens_per_s")
        print(
            f"| {100 * r['fraction']:.0f}% ({r['budget_mb']} MiB) | {r['policy']} | {r['limit_mb']} MiB | {dec if dec is None else f'{dec:.1f}'} | "
            f"{r.get('prefill_tokens_per_s') or 0:.1f} | {(r.get('cgroup_peak_bytes') or 0) / 2**20:.0f} MiB | "
            f"{(r.get('peak_rss_bytes') or 0) / 2**20:.0f} MiB | {(r.get('disk_read_bytes_per_token') or 0) / 1e6:.0f} MB | "
            f"{c.get('hits')} / {c.get('misses')} | {r.get('oom_kills')} |"
        )


if __name__ == "__main__":
    main()
