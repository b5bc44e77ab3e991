#!/usr/bin/env python3
"""Which experts the trained model's routers choose for each language of its held-out split: the
share of routing slots (token x top-k) each expert takes, per layer and language, as a heatmap
(docs/routing-by-language.svg), and how much the choice depends on the language.

    tools/.venv/bin/python tools/routing_profile.py --work /tmp/moe-train --out docs/routing-by-language.svg

The dependence is the mutual information between the language and the chosen expert, per layer,
as a share of the language's entropy (0: every language uses the experts alike; 1: the expert
tells the language). The router logits come from transformers (output_router_logits), over the
same held-out text that `moe-edge perplexity` reads.
"""

import argparse
import json
import math
import os

import numpy as np

LANGS = ["en", "de", "fr", "es", "it", "pl", "ru", "ja", "python", "rust"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True, help="the picture (.svg or .png)")
    ap.add_argument("--json", help="also write the shares and the dependence here")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import transformers
    from tokenizers import Tokenizer

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(args.work, "hf")).eval()
    tok = Tokenizer.from_file(os.path.join(args.work, "hf", "tokenizer.json"))
    cfg = model.config
    layers, experts, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    counts = np.zeros((len(LANGS), layers, experts))
    for li, lang in enumerate(LANGS):
        ids = tok.encode(open(os.path.join(args.work, "heldout", f"{lang}.txt"), encoding="utf-8").read()).ids
        for start in range(0, len(ids), args.context):
            chunk = torch.tensor([ids[start : start + args.context]])
            with torch.no_grad():
                out = model(input_ids=chunk, output_router_logits=True, use_cache=False)
            for layer, logits in enumerate(out.router_logits):
                top = torch.topk(logits.reshape(-1, experts), k, dim=-1).indices.reshape(-1)
                counts[li, layer] += np.bincount(top.numpy(), minlength=experts)
    share = counts / counts.sum(axis=2, keepdims=True)

    # mutual information I(language; expert) per layer, languages weighted equally
    dependence = []
    for layer in range(layers):
        p_e_given_l = share[:, layer]  # [lang, expert]
        p_e = p_e_given_l.mean(axis=0)
        mi = np.mean([np.sum(p[p > 0] * np.log(p[p > 0] / p_e[p > 0])) for p in p_e_given_l])
        dependence.append(mi / math.log(len(LANGS)))

    fig, axes = plt.subplots(1, layers, figsize=(3.1 * layers, 3.6), sharey=True)
    for layer, ax in enumerate(axes):
        im = ax.imshow(share[:, layer], cmap="viridis", vmin=0, vmax=share.max(), aspect="auto")
        ax.set_title(f"layer {layer}\nI(lang; expert) = {dependence[layer]:.2f}", fontsize=9)
        ax.set_xticks(range(experts))
        ax.set_xticklabels(range(experts), fontsize=6)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(LANGS)))
        ax.set_yticklabels(LANGS, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of the language's routing slots")
    fig.suptitle("moe-edge-mini: expert choice by language (held-out text; I as a share of the language entropy)", fontsize=10, y=1.06)
    tmp = args.out + ".tmp" + os.path.splitext(args.out)[1]
    fig.savefig(tmp, bbox_inches="tight", metadata={"Date": None} if args.out.endswith(".svg") else None)
    os.replace(tmp, args.out)
    result = dict(langs=LANGS, share=share.round(5).tolist(), dependence=dependence)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    for layer, d in enumerate(dependence):
        top = [f"{LANGS[li]}:{int(np.argmax(share[li, layer]))}({share[li, layer].max():.2f})" for li in range(len(LANGS))]
        print(f"layer {layer}: I(lang; expert)/H(lang) = {d:.3f}; most used expert per language: {' '.join(top)}")


if __name__ == "__main__":
    main()
