#!/usr/bin/env python3
"""Quality of the trained model in each form, per language of its held-out split, in one table:
moe-edge f32 (the ONNX export), int8 experts, int8 experts + int8 dense layers; llama.cpp F32,
Q8_0 and Q4_0 of the same checkpoint. Perplexity, mean KL divergence against the same engine's
f32 logits, and top-1 agreement with them; and moe-edge f32 against torch's perplexity
(tools/train_moe.py evaluate).

    tools/.venv/bin/python tools/quality_table.py --work /tmp/moe-train --out /tmp/quality \\
        --moe-edge target/release/moe-edge --llama-cpp /path/to/llama.cpp

--llama-cpp is a llama.cpp source tree with llama-perplexity and llama-quantize built in build/bin
(how: docs/QUALITY.md). Every run uses the same text files, windows of --context tokens with the
second half scored (llama-perplexity's scheme, which `moe-edge perplexity` follows).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys

LANGS = ["en", "de", "fr", "es", "it", "pl", "ru", "ja", "python", "rust"]
HERE = os.path.dirname(os.path.abspath(__file__))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("+ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def moe_edge_ppl(binary, model, files, context, extra):
    out = run([binary, "perplexity", "-m", model, *[a for f in files for a in ("-f", f)], "--context", str(context), "--json", *extra])
    j = json.loads(out.stdout)
    res = {t["label"]: t for t in j["texts"]}
    res["all"] = j["all"]
    return res


def llama_ppl(bin_dir, gguf, text, context, extra):
    out = run([os.path.join(bin_dir, "llama-perplexity"), "-m", gguf, "-f", text, "-c", str(context), "-b", str(context), "-t", str(os.cpu_count()), *extra])
    log_text = out.stdout + out.stderr
    r = {}
    # later patterns win: in KL mode "Mean PPL(Q)" is the model's perplexity
    for key, pattern, scale in (
        ("perplexity", r"Final estimate: PPL = ([\d.]+)", 1),
        ("perplexity", r"Mean PPL\(Q\)\s*:\s*([\d.]+)", 1),
        ("kl_mean", r"Mean\s+KLD:\s*([-\d.]+)", 1),
        ("kl_median", r"Median\s+KLD:\s*([-\d.]+)", 1),
        ("kl_p99", r"99\.0%\s+KLD:\s*([-\d.]+)", 1),
        ("top1_agreement", r"Same top p:\s*([\d.]+)\s*±", 0.01),
    ):
        m = re.search(pattern, log_text)
        if m:
            r[key] = float(m.group(1)) * scale
    if "perplexity" not in r or ("--kl-divergence" in extra and ("top1_agreement" not in r or "kl_mean" not in r)):
        raise SystemExit(f"llama-perplexity's output lacks a figure ({sorted(r)}):\n{log_text[-3000:]}")
    return r


def convert_gguf(llama, hf, out):
    """convert_hf_to_gguf.py with the tokenizer named: the model's tokenizer is a byte-level BPE with
    GPT-2's pre-tokenizer, which the converter only knows by the hashes of published ones (and it
    tries SentencePiece first for Llama-family models)."""
    code = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import conversion.base as base

def no_sentencepiece(*args):
    raise FileNotFoundError("no SentencePiece model")

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
base.TextModel._set_vocab_llama_hf = no_sentencepiece
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    run([sys.executable, "-c", code, llama, hf, "--outtype", "f32", "--outfile", out])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="tools/train_moe.py's working directory (hf/, heldout/, eval.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--moe-edge", required=True, help="the moe-edge binary (a release build)")
    ap.add_argument("--llama-cpp", help="llama.cpp source tree with build/bin (skipped when not given)")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    files = [os.path.join(args.work, "heldout", f"{lang}.txt") for lang in LANGS]
    onnx = os.path.join(args.out, "onnx")
    if not os.path.exists(os.path.join(onnx, "model.onnx")):
        run([sys.executable, os.path.join(HERE, "export_moe.py"), "--checkpoint", os.path.join(args.work, "hf"), "--out", onnx])
    packs = {"int8": ["--experts", "int8"], "int8d": ["--experts", "int8", "--dense", "int8"]}
    for name, flags in packs.items():
        if not os.path.exists(os.path.join(args.out, name)):
            run([args.moe_edge, "pack", onnx, "-o", os.path.join(args.out, name), *flags])

    table = {}
    base = os.path.join(args.out, "f32.logits")
    table["moe-edge f32"] = moe_edge_ppl(args.moe_edge, onnx, files, args.context, ["--save-logits", base])
    for name in packs:
        table[f"moe-edge {name}"] = moe_edge_ppl(args.moe_edge, os.path.join(args.out, name), files, args.context, ["--kl-base", base])
    os.remove(base)

    if args.llama_cpp:
        bin_dir = os.path.join(args.llama_cpp, "build", "bin")
        f32 = os.path.join(args.out, "model-f32.gguf")
        if not os.path.exists(f32):
            convert_gguf(args.llama_cpp, os.path.join(args.work, "hf"), f32)
        ggufs = {"F32": f32}
        for q in ("Q8_0", "Q4_0"):
            ggufs[q] = os.path.join(args.out, f"model-{q.lower()}.gguf")
            if not os.path.exists(ggufs[q]):
                run([os.path.join(bin_dir, "llama-quantize"), f32, ggufs[q], q])
        for name, gguf in ggufs.items():
            table[f"llama.cpp {name}"] = {}
        for lang, text in zip(LANGS, files):
            kld = os.path.join(args.out, f"{lang}.kld")
            table["llama.cpp F32"][lang] = llama_ppl(bin_dir, f32, text, args.context, ["--kl-divergence-base", kld])
            for q in ("Q8_0", "Q4_0"):
                table[f"llama.cpp {q}"][lang] = llama_ppl(bin_dir, ggufs[q], text, args.context, ["--kl-divergence-base", kld, "--kl-divergence"])
            os.remove(kld)
        sizes = {name: os.path.getsize(g) for name, g in ggufs.items()}
    else:
        sizes = {}

    for name, res in table.items():
        if "all" not in res:
            res["all"] = aggregate([res[lang] for lang in LANGS], [table["moe-edge f32"][lang]["scored"] for lang in LANGS])
    torch_eval = json.load(open(os.path.join(args.work, "eval.json")))["per_language"]
    agreement = {lang: table["moe-edge f32"][lang]["perplexity"] / torch_eval[lang]["perplexity"] - 1 for lang in LANGS}
    result = dict(context=args.context, table=table, torch=torch_eval, moe_edge_f32_vs_torch_relative=agreement, gguf_bytes=sizes)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(table, torch_eval))
    log("moe-edge f32 vs torch, relative perplexity difference: " + ", ".join(f"{k} {v:+.2e}" for k, v in agreement.items()))


def aggregate(results, weights):
    """Over every language: perplexity from the weighted mean log-perplexity, means weighted by the
    scored tokens (llama-perplexity reports per file only)."""
    total = sum(weights)
    out = dict(perplexity=math.exp(sum(w * math.log(r["perplexity"]) for r, w in zip(results, weights)) / total))
    for key in ("kl_mean", "top1_agreement"):
        if all(key in r for r in results):
            out[key] = sum(w * r[key] for r, w in zip(results, weights)) / total
    return out


def cell(r, key):
    if key == "perplexity":
        return f"{r['perplexity']:.3f}"
    if key == "kl":
        v = r["kl"]["mean"] if "kl" in r else r.get("kl_mean")
        return "" if v is None else f"{v:.5f}"
    v = r.get("top1_agreement")
    return "" if v is None else f"{100 * v:.2f}%"


def markdown(table, torch_eval):
    cols = LANGS + ["all"]
    rows = ["| form | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    rows.append("| torch f32, perplexity | " + " | ".join(f"{torch_eval[c]['perplexity']:.3f}" for c in cols) + " |")
    for key, title in (("perplexity", "perplexity"), ("kl", "mean KL"), ("top1", "top-1 agreement")):
        for name, res in table.items():
            if key != "perplexity" and name.endswith(("f32", "F32")):
                continue
            rows.append(f"| {name}, {title} | " + " | ".join(cell(res[c], key) for c in cols) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
