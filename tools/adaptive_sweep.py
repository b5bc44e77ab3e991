#!/usr/bin/env python3
"""What adaptive top-k costs: perplexity, KL divergence and top-1 agreement against the f32 model's
logits, and the share of expert slots skipped, for a list of --min-expert-weight and
--top-p-experts settings, over the trained model's held-out text.

    tools/.venv/bin/python tools/adaptive_sweep.py --f32 /tmp/quality/onnx --model models/moe-edge-mini \\
        --texts /tmp/moe-train/heldout --moe-edge target/release/moe-edge
"""

import argparse
import json
import os
import subprocess
import sys

SETTINGS = [[], ["--min-expert-weight", "0.1"], ["--min-expert-weight", "0.2"], ["--min-expert-weight", "0.3"],
            ["--min-expert-weight", "0.4"], ["--top-p-experts", "0.9"], ["--top-p-experts", "0.8"], ["--top-p-experts", "0.6"]]


def ppl(binary, model, files, extra):
    cmd = [binary, "perplexity", "-m", model, *[a for f in files for a in ("-f", f)], "--context", "256", "--json", *extra]
    print("+ " + " ".join(cmd), file=sys.stderr)
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f32", required=True, help="the f32 export (the KL base)")
    ap.add_argument("--model", required=True, help="the model measured (a pack)")
    ap.add_argument("--texts", required=True, help="directory of held-out .txt files")
    ap.add_argument("--moe-edge", required=True)
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args()
    files = sorted(os.path.join(args.texts, f) for f in os.listdir(args.texts) if f.endswith(".txt"))
    base = os.path.join(os.path.dirname(os.path.abspath(args.json or ".")), "adaptive-base.logits")
    ppl(args.moe_edge, args.f32, files, ["--save-logits", base])
    rows = []
    try:
        for extra in SETTINGS:
            j = ppl(args.moe_edge, args.model, files, ["--kl-base", base, *extra])
            rows.append(dict(setting=" ".join(extra) or "top-2 (learnt)", all=j["all"], routing=j["routing"]))
    finally:
        os.remove(base)
    print("| setting | experts skipped | perplexity | mean KL vs f32 | p99 KL | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a = r["all"]
        print(f"| {r['setting']} | {100 * r['routing']['skipped_share']:.1f}% | {a['perplexity']:.3f} | {a['kl']['mean']:.5f} | "
              f"{a['kl']['p99']:.4f} | {100 * a['top1_agreement']:.2f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
