#!/usr/bin/env python3
"""Create a random-weight MoE language model at a given shape and export it as a KV-cache ONNX
decoder (form A: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value ->
logits, present.{i}.key/value), verified against torch with onnxruntime.

The same seed gives the same weights, so results are comparable across machines and engines.

    tools/.venv/bin/python tools/export_moe.py --preset small --out models/bench/small

Experts are exported in form R1 (transformers' experts_implementation="batched_mm"), which is
what moe-edge replaces with its sparse op. Large models get their weights in external data
(model.onnx.data) next to model.onnx.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import transformers
from transformers import DynamicCache

PRESETS = {
    # Mixtral-style, ~151 M parameters
    "small": dict(arch="mixtral", layers=8, hidden=512, heads=8, kv_heads=8, experts=8, top_k=2, ffn=1408, vocab=4096),
    # OLMoE-style (q/k norm, no top-k renormalisation), ~1.34 B parameters
    "olmoe-s": dict(arch="olmoe", layers=16, hidden=1024, heads=16, kv_heads=16, experts=32, top_k=4, ffn=768, vocab=32000),
    # a few MB, for quick checks
    "mini": dict(arch="mixtral", layers=2, hidden=128, heads=4, kv_heads=2, experts=8, top_k=2, ffn=256, vocab=1024),
    "mini-qwen2": dict(arch="qwen2_moe", layers=2, hidden=128, heads=4, kv_heads=2, experts=8, top_k=2, ffn=256, vocab=1024),
}


def make_config(p, init_std):
    common = dict(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=4096,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    arch = p["arch"]
    if arch == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=p["ffn"], num_local_experts=p["experts"], num_experts_per_tok=p["top_k"], **common
        )
    if arch == "olmoe":
        return transformers.OlmoeConfig(
            intermediate_size=p["ffn"], num_experts=p["experts"], num_experts_per_tok=p["top_k"], norm_topk_prob=False, **common
        )
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            intermediate_size=p["ffn"] * 2,
            moe_intermediate_size=p["ffn"],
            shared_expert_intermediate_size=p["ffn"] * 2,
            num_experts=p["experts"],
            num_experts_per_tok=p["top_k"],
            norm_topk_prob=False,
            decoder_sparse_step=1,
            **common,
        )
    raise SystemExit(f"unknown arch {arch}")


class FormADecoder(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past as flat tensors."""

    def __init__(self, model, layers):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def write_tokenizer(out_dir, vocab):
    """A word-level tokenizer over the tokens t0..t{vocab-1} (the models have random weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {s: i for i, s in enumerate(specials)}
    for i in range(len(specials), vocab):
        words[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    for i, s in enumerate(specials):
        tok.add_special_tokens([s])
    tok.save(os.path.join(out_dir, "tokenizer.json"))


def export(model, cfg, p, path):
    layers = p["layers"]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kvh = cfg.num_key_value_heads
    batch, seq, past_len = 2, 3, 5
    ids = torch.randint(3, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).unsqueeze(0).repeat(batch, 1)
    past = [torch.randn(batch, kvh, past_len, head_dim) * 0.1 for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dyn = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for n in past_names:
        dyn[n] = {0: "batch_size", 2: "past_sequence_length"}
    for n in present_names:
        dyn[n] = {0: "batch_size", 2: "total_sequence_length"}
    wrapper = FormADecoder(model, layers).eval()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, mask, pos, *past),
            path,
            dynamo=False,
            opset_version=20,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dyn,
        )
    # weights go to one external data file when the model is large
    import onnx

    size = sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path)))
    m = onnx.load(path)
    if size > 1 << 30:
        # the exporter's per-tensor files go; the checkpoint (--save-hf: OUT/hf) and the
        # tokenizer and config files stay
        for f in os.listdir(os.path.dirname(path)):
            p = os.path.join(os.path.dirname(path), f)
            if os.path.isfile(p) and f != "model.onnx" and not f.endswith(".json"):
                os.remove(p)
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return m


def verify(model, cfg, p, path, steps, seed):
    """Prefill a 7-token prompt, then `steps` greedy steps, in torch and onnxruntime."""
    import onnxruntime as ort

    layers = p["layers"]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, cfg.vocab_size, size=(1, 7))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, cfg.num_key_value_heads, 0, head_dim), np.float32) for i in range(layers) for kv in ("key", "value")}
    ids = prompt
    worst = 0.0
    torch_tokens, ort_tokens = [], []
    with torch.no_grad():
        t_ids = torch.tensor(prompt)
        t_cache = DynamicCache(config=cfg)
        for step in range(steps + 1):
            total = next(iter(past.values())).shape[2] + ids.shape[1]
            feeds = {
                "input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(total - ids.shape[1], total, dtype=np.int64)[None],
                **past,
            }
            outs = sess.run(None, feeds)
            logits = outs[0][0, -1]
            for i, name in enumerate(past):
                past[name] = outs[1 + i]
            t_out = model(input_ids=t_ids, past_key_values=t_cache, use_cache=True)
            t_logits = t_out.logits[0, -1].numpy()
            worst = max(worst, float(np.abs(logits - t_logits).max()))
            nt, no = int(t_logits.argmax()), int(logits.argmax())
            torch_tokens.append(nt)
            ort_tokens.append(no)
            ids = np.array([[no]])
            t_ids = torch.tensor([[nt]])
    return dict(prompt=prompt[0].tolist(), torch_tokens=torch_tokens, ort_tokens=ort_tokens, max_abs_logit_diff=worst, tokens_equal=torch_tokens == ort_tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a random-weight model of this shape")
    ap.add_argument("--checkpoint", help="export this trained checkpoint (a transformers directory, e.g. tools/train_moe.py's WORK/hf) instead; its tokenizer files are copied")
    ap.add_argument("--out", required=True, help="output directory (model.onnx, config.json, tokenizer.json, export.json)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--verify-steps", type=int, default=4, help="greedy steps checked against torch (0: skip)")
    ap.add_argument("--save-hf", action="store_true", help="also save the checkpoint (safetensors) under OUT/hf")
    args = ap.parse_args()

    if (args.preset is None) == (args.checkpoint is None):
        raise SystemExit("give --preset or --checkpoint")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, attn_implementation="eager").eval()
        cfg = model.config
        cfg._attn_implementation = "eager"
        p = dict(layers=cfg.num_hidden_layers, vocab=cfg.vocab_size)
        import shutil

        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if os.path.exists(os.path.join(args.checkpoint, f)):
                shutil.copy(os.path.join(args.checkpoint, f), args.out)
    else:
        p = PRESETS[args.preset]
        cfg = make_config(p, args.init_std)
        cfg._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.set_experts_implementation("batched_mm")
    params = sum(t.numel() for t in model.parameters())
    print(f"{args.preset or args.checkpoint}: {p} -> {params / 1e6:.1f} M parameters", file=sys.stderr)
    if args.save_hf:
        model.save_pretrained(os.path.join(args.out, "hf"))
    cfg.save_pretrained(args.out)
    if not args.checkpoint:
        write_tokenizer(args.out, p["vocab"])

    path = os.path.join(args.out, "model.onnx")
    t0 = time.time()
    export(model, cfg, p, path)
    export_s = time.time() - t0
    result = dict(preset=args.preset, checkpoint=args.checkpoint, shape=p, parameters=params, seed=args.seed, init_std=args.init_std, export_seconds=export_s,
                  method="torch.onnx.export(dynamo=False), experts_implementation=batched_mm, attn eager, opset 20",
                  versions=dict(torch=torch.__version__, transformers=transformers.__version__))
    if args.verify_steps:
        v = verify(model, cfg, p, path, args.verify_steps, args.seed)
        result["verification"] = v
        print(f"verification: tokens equal {v['tokens_equal']}, max abs logit diff {v['max_abs_logit_diff']:.2e}", file=sys.stderr)
        if not v["tokens_equal"] or v["max_abs_logit_diff"] > 1e-3:
            json.dump(result, open(os.path.join(args.out, "export.json"), "w"), indent=1)
            raise SystemExit("onnxruntime does not match torch")
    json.dump(result, open(os.path.join(args.out, "export.json"), "w"), indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
