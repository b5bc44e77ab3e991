#!/usr/bin/env python3
"""What each way of steering the experts costs and saves on the trained model, per language:
pruning by a routing profile (global or the language's own, 75% and 50% of the experts kept),
static routing (a fixed top-k per layer from a profile), adaptive top-k, the full pack with a
profile's hottest experts pinned in the cache, and (with --source) cold experts in int4, against the full
pack. For every (method, language): expert slots run per token and layer, expert bytes the method
needs (pack size, or resident for static routing), perplexity, KL divergence and top-1 agreement
against the full pack's logits on the language's held-out text, and decode speed with an expert
cache of 25% of the full pack's expert bytes.

The profiles are taken on training text (a sample per language, not the held-out text the
quality is measured on).

    python3 tools/steering_table.py --model models/moe-edge-mini --moe-edge target/release/moe-edge \\
        --source /tmp/quality/onnx --train /tmp/moe-train/corpus/train.jsonl --heldout /tmp/moe-train/heldout --work /tmp/steer \\
        --json docs/steering-moe-edge-mini.json --plot docs/steering-quality-vs-bytes.svg
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys

CONTEXT = 256


def run(cmd, **kw):
    print("+ " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def sample_training_text(train_jsonl, langs, out_dir, per_lang_bytes):
    """A deterministic sample of each language's training documents (chosen by a hash of their names)."""
    docs = {l: [] for l in langs}
    with open(train_jsonl) as f:
        for line in f:
            d = json.loads(line)
            if d.get("lang") in docs and d.get("text"):
                key = hashlib.sha256(d["name"].encode()).hexdigest()
                docs[d["lang"]].append((key, d["text"]))
    paths = {}
    os.makedirs(out_dir, exist_ok=True)
    for lang, items in docs.items():
        items.sort()
        text, size = [], 0
        for _, t in items:
            if size >= per_lang_bytes:
                break
            text.append(t[:8000])
            size += len(text[-1].encode())
        paths[lang] = os.path.join(out_dir, f"{lang}.txt")
        with open(paths[lang], "w") as f:
            f.write("\n\n".join(text))
    return paths


def report(rows, langs, budget_mb, full_bytes, args):
    """Prints the tables; writes the JSON and the quality-vs-bytes plot when asked."""
    # 5. tables
    names = list(dict.fromkeys(r["method"] for r in rows))
    print(f"moe-edge-mini, {args.threads} threads, cache budget {budget_mb} MiB (25% of {full_bytes / 2**20:.1f} MiB of experts); "
          f"means over {len(langs)} languages\n")
    print("| method | experts run per token and layer | expert bytes needed | perplexity (full: same text) | mean KL vs full | "
          "top-1 agreement | expert reads per token (cache 25%) | decode tok/s (cache 25%) |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for n in names:
        rs = [r for r in rows if r["method"] == n]
        m = {k: statistics.mean(r[k] for r in rs) for k in
             ("slots_per_token_layer", "expert_bytes", "perplexity", "base_perplexity", "kl_mean", "top1",
              "expert_reads_per_token", "decode_tok_s")}
        m["method"] = n
        summary.append(m)
        print(f"| {n} | {m['slots_per_token_layer']:.2f} | {m['expert_bytes'] / 2**20:.1f} MiB | {m['perplexity']:.2f} "
              f"({m['base_perplexity']:.2f}) | {m['kl_mean']:.4f} | {100 * m['top1']:.1f}% | {m['expert_reads_per_token']:.2f} | "
              f"{m['decode_tok_s']:.0f} |")
    print("\nPerplexity per language (the full pack's first):\n")
    print("| method | " + " | ".join(langs) + " |")
    print("|---|" + "---|" * len(langs))
    for n in names:
        by = {r["lang"]: r for r in rows if r["method"] == n}
        print(f"| {n} | " + " | ".join(f"{by[l]['perplexity']:.1f}" for l in langs) + " |")
    print("\nMean KL vs full per language:\n")
    print("| method | " + " | ".join(langs) + " |")
    print("|---|" + "---|" * len(langs))
    for n in names[1:]:
        by = {r["lang"]: r for r in rows if r["method"] == n}
        print(f"| {n} | " + " | ".join(f"{by[l]['kl_mean']:.3f}" for l in langs) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(budget_mb=budget_mb, full_expert_bytes=full_bytes, threads=args.threads, languages=langs,
                           summary=summary, rows=rows), f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        lossy = [m for m in summary if m["kl_mean"] > 0]  # the full pack and pinning change nothing
        for m in lossy:
            ax.scatter(m["expert_bytes"] / 2**20, m["kl_mean"], s=40)
            ax.annotate(m["method"], (m["expert_bytes"] / 2**20, m["kl_mean"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
        ax.set_xlim(0, max(m["expert_bytes"] for m in summary) / 2**20 * 1.45)
        ax.set_yscale("log")
        ax.set_xlabel("expert bytes the method needs (MiB)")
        ax.set_ylabel("mean KL divergence vs the full pack (log)")
        ax.set_title("moe-edge-mini: quality vs expert bytes, mean over 10 languages")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the full pack")
    ap.add_argument("--moe-edge")
    ap.add_argument("--train", help="train.jsonl of tools/train_moe.py's corpus")
    ap.add_argument("--heldout", help="directory of held-out LANG.txt files")
    ap.add_argument("--work")
    ap.add_argument("--source", help="the f32 export the pack was made from: adds mixed int8/int4 and int4 packs")
    ap.add_argument("--sample-kb", type=int, default=48, help="training text profiled per language")
    ap.add_argument("--rounds", type=int, default=3, help="decode speed: interleaved rounds (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--from-json", help="print the tables (and --plot) from an earlier run's --json, measuring nothing")
    args = ap.parse_args()
    if args.from_json:
        j = json.load(open(args.from_json))
        args.threads = j["threads"]
        report(j["rows"], j["languages"], j["budget_mb"], j["full_expert_bytes"], args)
        return
    if not all([args.model, args.moe_edge, args.train, args.heldout, args.work]):
        ap.error("--model, --moe-edge, --train, --heldout and --work are needed to measure")
    exe, work = args.moe_edge, args.work
    os.makedirs(work, exist_ok=True)
    langs = sorted(f[:-4] for f in os.listdir(args.heldout) if f.endswith(".txt"))
    heldout = {l: os.path.join(args.heldout, f"{l}.txt") for l in langs}
    threads = ["--threads", str(args.threads)]

    # 1. profiles on training text: one run, labelled per language (overall = all of them)
    train = sample_training_text(args.train, langs, os.path.join(work, "train"), args.sample_kb * 1024)
    profile = os.path.join(work, "profile.json")
    run([exe, "profile", "-m", args.model, *[a for l in langs for a in ("-f", train[l])],
         "--labels", ",".join(langs), "--context", str(CONTEXT), "-o", profile, "--plot", os.path.join(work, "plots"),
         *threads])
    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    experts = manifest["layers"][0]["spec"]["experts"]
    layers = len(manifest["layers"])
    full_bytes = os.path.getsize(os.path.join(args.model, "experts.bin"))
    per_expert = sum(l["expert_file_bytes"] for l in manifest["layers"]) / (experts * layers)
    budget_mb = max(1, round(0.25 * full_bytes / 2**20))

    # 2. the packs: pruned by the global profile and by each language's
    packs = {}
    for share, keep in (("75%", experts * 3 // 4), ("50%", experts // 2)):
        for scope in ["global", *langs]:
            out = os.path.join(work, "packs", f"{scope}-{keep}")
            label = [] if scope == "global" else ["--label", scope]
            run([exe, "prune", args.model, "--profile", profile, *label, "--keep", str(keep), "-o", out])
            packs[(share, scope)] = out

    if args.source:
        for name, extra in (("int4-cold-0.9", ["--int4-cold", profile, "--int8-share", "0.9"]),
                            ("int4-cold-0.5", ["--int4-cold", profile, "--int8-share", "0.5"]),
                            ("int4", ["--experts", "int4"])):
            out = os.path.join(work, "packs", name)
            run([exe, "pack", args.source, "-o", out, *extra])
            packs[name] = out

    def methods(lang):
        """(name, model, extra args, expert bytes it needs)"""
        yield "full (learnt top-2)", args.model, [], full_bytes
        yield "full, own profile's hot experts pinned in half the cache", args.model, ["--pin-hot", f"{profile}:{lang}"], full_bytes
        for share in ("75%", "50%"):
            for scope in ("global", "own"):
                pack = packs[(share, "global" if scope == "global" else lang)]
                yield f"pruned to {share}, {scope} profile", pack, [], os.path.getsize(os.path.join(pack, "experts.bin"))
        top_k = manifest["layers"][0]["spec"]["top_k"]
        yield "static routing, global profile", args.model, ["--route", f"static:{profile}"], top_k * layers * per_expert
        yield "static routing, own profile", args.model, ["--route", f"static:{profile}:{lang}"], top_k * layers * per_expert
        for w in ("0.1", "0.2", "0.3"):
            yield f"adaptive, weight >= {w}", args.model, ["--min-expert-weight", w], full_bytes
        if args.source:
            for key, name in (("int4-cold-0.9", "int8 for 90% of the slots, cold experts int4 (global profile)"),
                              ("int4-cold-0.5", "int8 for 50% of the slots, cold experts int4 (global profile)"),
                              ("int4", "all experts int4")):
                yield name, packs[key], [], os.path.getsize(os.path.join(packs[key], "experts.bin"))

    # 3. quality per language against the full pack's logits
    rows = []
    for lang in langs:
        base = os.path.join(work, f"base-{lang}.logits")
        run([exe, "perplexity", "-m", args.model, "-f", heldout[lang], "--context", str(CONTEXT), "--save-logits", base,
             "--json", *threads])
        for name, model, extra, need in methods(lang):
            j = json.loads(run([exe, "perplexity", "-m", model, "-f", heldout[lang], "--context", str(CONTEXT),
                                "--kl-base", base, "--json", *threads, *extra]))
            a = j["all"]
            fed = (a["tokens"] // CONTEXT) * CONTEXT
            rows.append(dict(method=name, lang=lang, model=model, extra=extra, expert_bytes=need,
                             slots_per_token_layer=j["routing"]["routed_slots"] / (fed * layers),
                             perplexity=a["perplexity"], base_perplexity=a["base_perplexity"],
                             kl_mean=a["kl"]["mean"], kl_p99=a["kl"]["p99"], top1=a["top1_agreement"]))
        os.remove(base)

    # 4. decode speed with a cache of 25% of the full expert bytes, interleaved rounds
    speed = {}
    for _ in range(args.rounds):
        for r in rows:
            prompt = open(heldout[r["lang"]]).read()[:300]
            j = json.loads(run([exe, "generate", "-m", r["model"], "--prompt", prompt, "--max-tokens", "64", "--ignore-eos",
                                "--expert-cache-mb", str(budget_mb), "--json", *threads, *r["extra"]]))
            c = j["cache"]
            tokens = len(j["prompt_ids"]) + len(j["generated_ids"])
            speed.setdefault((r["method"], r["lang"]), []).append((j["decode_tokens_per_s"], c["misses"] / tokens))
    for r in rows:
        s = speed[(r["method"], r["lang"])]
        r["decode_tok_s"] = statistics.median(x[0] for x in s)
        r["expert_reads_per_token"] = statistics.median(x[1] for x in s)

    report(rows, langs, budget_mb, full_bytes, args)


if __name__ == "__main__":
    main()
