#!/usr/bin/env python3
"""Writes the seed inputs of fuzz/corpus/ from the repository's fixtures (the onnx and npy seeds
are symbolic links to tests/fixtures). Run from the repository root after `cargo build`:
    python3 fuzz/seeds.py target/debug/moe-edge
Multi-file inputs join their files with moe_edge_fuzz::SEPARATOR."""
import json, os, struct, subprocess, sys, tempfile

SEP = b"\n\x00moe-edge-fuzz-file\x00\n"
CHAT = "tests/fixtures/chat"
TINY = "models/tiny-mixtral"
OUT = "fuzz/corpus"


def rd(p):
    with open(p, "rb") as f:
        return f.read()


def put(target, name, data):
    os.makedirs(f"{OUT}/{target}", exist_ok=True)
    with open(f"{OUT}/{target}/{name}", "wb") as f:
        f.write(data)


def link(target, name, fixture):
    os.makedirs(f"{OUT}/{target}", exist_ok=True)
    path = f"{OUT}/{target}/{name}"
    if os.path.lexists(path):
        os.remove(path)
    os.symlink(os.path.relpath(fixture, f"{OUT}/{target}"), path)


def main(cli):
    for arch in ["mixtral", "qwen2_moe"]:
        for form in ["legacy_batched", "dynamo_batched", "legacy_eager"]:
            link("onnx", f"block-{arch}-{form}.onnx", f"tests/fixtures/hf-moe/blocks/{arch}/{form}/model.onnx")
    for i in range(5):
        link("npy", f"ids-{i}.npy", f"tests/fixtures/hf-moe/inputs/input_ids_{i}.npy")

    # packs of the block fixtures (and one KV decoder with int8 dense layers), small alignment
    packs = [
        ("mixtral-int8", "tests/fixtures/hf-moe/blocks/mixtral/legacy_batched/model.onnx", ["--experts", "int8"]),
        ("qwen2_moe-int8-f32-scales", "tests/fixtures/hf-moe/blocks/qwen2_moe/legacy_batched/model.onnx",
         ["--experts", "int8", "--int8-scales", "f32"]),
        ("mixtral-f16", "tests/fixtures/hf-moe/blocks/mixtral/dynamo_batched/model.onnx", ["--experts", "f16"]),
        ("kv-mixtral-dense-int8", "tests/fixtures/hf-moe-kv/mixtral/model.onnx", ["--experts", "int8", "--dense", "int8"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, src, opts in packs:
            out = f"{tmp}/{name}"
            subprocess.run([cli, "pack", src, "-o", out, "--align", "64", *opts], check=True, capture_output=True)
            put("pack", name, SEP.join([rd(f"{out}/manifest.json"), rd(f"{out}/experts.bin"), rd(f"{out}/model.onnx")]))

    cases = json.load(open(f"{CHAT}/cases.json"))
    convs = []

    def find(o):
        if isinstance(o, dict):
            if isinstance(o.get("messages"), list):
                convs.append(o["messages"])
            for v in o.values():
                find(v)
        elif isinstance(o, list):
            for v in o:
                find(v)

    find(cases)
    special = {"chatml": (b"", b"<|im_end|>"), "llama3": (b"<|begin_of_text|>", b"<|eot_id|>"),
               "mistral": (b"<s>", b"</s>"), "granite": (b"", b"<|end_of_text|>")}
    for i, (name, (bos, eos)) in enumerate(special.items()):
        put("chat_template", name, SEP.join([rd(f"{CHAT}/{name}.jinja"), json.dumps(convs[i]).encode(), bos, eos]))
    put("chat_template", "loops", SEP.join([
        b"{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ m.role|upper }}: "
        b"{{ m.content|trim }}{% if not loop.last %}\n{% endif %}{% endfor %}{{ messages|tojson }}"
        b"{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}"
        b"{{ raise_exception('x') if false }}{{ 'a,b'.split(',')|join('-') }}{{ {'k': 1}.items()|list }}",
        b'[{"role":"user","content":"x"}]', b"<s>", b"</s>"]))

    put("companions", "tiny-mixtral", SEP.join([rd(f"{TINY}/tokenizer.json"), rd(f"{TINY}/config.json"),
                                                rd(f"{TINY}/tokenizer_config.json"), b""]))
    put("companions", "chat-chatml", SEP.join([
        rd(f"{CHAT}/tokenizer.json"),
        b'{"eos_token_id":[1,2],"bos_token_id":0,"max_position_embeddings":64,"model_type":"qwen3_moe"}',
        json.dumps({"bos_token": None, "eos_token": {"content": "<|im_end|>", "special": True}}).encode(),
        rd(f"{CHAT}/chatml.jinja")]))
    put("companions", "template-in-config", SEP.join([
        rd(f"{CHAT}/tokenizer.json"), b'{"eos_token_id":2}',
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": [
            {"name": "default", "template": rd(f"{CHAT}/mistral.jinja").decode()},
            {"name": "tool_use", "template": "x"}]}).encode(), b""]))

    requests = [
        (0, {"model": "moe-edge", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hello"}],
             "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n", "END"],
             "stream": True, "stream_options": {"include_usage": True}}),
        (0, {"messages": [{"role": "user", "content": "¿Qué hace tar?"}], "max_completion_tokens": 8, "n": 1}),
        (1, {"model": "moe-edge", "prompt": "t10 t20 t30", "max_tokens": 4, "temperature": 0, "stop": "t40"}),
        (1, {"prompt": "", "temperature": 2.5, "top_p": 0}),
    ]
    for i, (kind, body) in enumerate(requests):
        put("server_request", f"req-{i}", bytes([kind]) + json.dumps(body, ensure_ascii=False).encode())

    def call(op, capacity, rest):
        return bytes([op]) + struct.pack("<H", capacity) + rest

    def gen(op, max_tokens, temp, top_p, top_k, penalty, seed, prompt):
        return call(op, 0, bytes([max_tokens]) + struct.pack("<ffHfH", temp, top_p, top_k, penalty, seed) + prompt)

    put("capi", "tokenize", call(0, 4, "t10 t20 t30 t40 Grüß".encode()))
    put("capi", "detokenize", call(1, 64, struct.pack("<6i", 1, 10, 20, 30, 511, 3)))
    put("capi", "template", call(2, 512, b"\x01system\x00Be brief.\x00user\x00Hello\x00assistant\x00Hi\x00user\x00Again"))
    put("capi", "generate", gen(3, 3, 0.0, 1.0, 0, 1.0, 0, b"t10 t20 t30"))
    put("capi", "generate-sampled", gen(3, 3, 0.8, 0.9, 5, 1.1, 7, b"t1 t2"))
    put("capi", "chat", gen(4, 2, 0.0, 1.0, 0, 1.0, 0, b"Hello there"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/debug/moe-edge")
