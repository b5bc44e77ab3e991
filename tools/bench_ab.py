#!/usr/bin/env python3
"""Two moe-edge binaries on the same models, in interleaved rounds (A, B, A, B, ...), so that a
change's speed is judged on one machine in one run. Prints per model and binary the median over
rounds of `moe-edge bench`'s median prefill and decode tokens/s, and B/A ratios.

    tools/bench_ab.py --a /tmp/moe-edge-before --b target/release/moe-edge \\
        --model models/bench/small --model models/bench/small-int8 --rounds 5 --threads 2
"""
import argparse
import json
import statistics
import subprocess


def bench(binary, model, args):
    cmd = [binary, "--threads", str(args.threads), "bench", "-m", model,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--repeat", str(args.repeat), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="baseline binary")
    ap.add_argument("--b", required=True, help="binary to compare")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    results = {(m, which): {"prefill": [], "decode": []} for m in args.model for which in "AB"}
    for r in range(args.rounds):
        for model in args.model:
            # alternate which binary goes first, so that neither always runs on a warmer machine
            order = [("A", args.a), ("B", args.b)] if r % 2 == 0 else [("B", args.b), ("A", args.a)]
            for which, binary in order:
                rep = bench(binary, model, args)
                results[(model, which)]["prefill"].append(rep["prefill_tokens_per_s"])
                results[(model, which)]["decode"].append(rep["decode_tokens_per_s"])
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\n{'model':<28} {'bin':<3} {'prefill tok/s':>14} {'decode tok/s':>13}   (median of {args.rounds} rounds; "
          f"threads {args.threads}, prompt {args.prompt_tokens}, generate {args.gen_tokens})")
    for model in args.model:
        med = {w: {k: statistics.median(v) for k, v in results[(model, w)].items()} for w in "AB"}
        for w in "AB":
            print(f"{model:<28} {w:<3} {med[w]['prefill']:>14.1f} {med[w]['decode']:>13.1f}")
        print(f"{model:<28} B/A {med['B']['prefill'] / med['A']['prefill']:>14.3f} "
              f"{med['B']['decode'] / med['A']['decode']:>13.3f}")
        for w in "AB":
            print(f"    {w} decode per round: {', '.join(f'{v:.1f}' for v in results[(model, w)]['decode'])}")


if __name__ == "__main__":
    main()
