#!/usr/bin/env python3
"""torch's routing of the reference kit's Mixtral over one of the kit's inputs, for the tests of
routing traces: per layer and position, the top-k experts (the router's order) and their
renormalised weights.

    tools/.venv/bin/python tools/routing_fixture.py --checkpoint ../shared/kit/hf-moe/models/mixtral/hf \\
        --input tests/fixtures/hf-moe/inputs/input_ids_3.npy --out tests/fixtures/hf-moe/models/mixtral/torch_routing_3.json
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--input", required=True, help="int64 ids [1, seq] (.npy)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, attn_implementation="eager").eval()
    ids = torch.from_numpy(np.load(args.input))
    assert ids.shape[0] == 1, "one sequence"
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
    layers = []
    for logits in out.router_logits:
        probs = torch.softmax(logits.reshape(ids.shape[1], -1).double(), dim=-1)
        w, e = torch.topk(probs, k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)  # Mixtral renormalises the top-k weights
        layers.append(dict(experts=e.tolist(), weights=w.tolist()))
    meta = dict(input=os.path.basename(args.input), top_k=k, layers=layers,
                versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    with open(args.out + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
