#!/usr/bin/env python3
"""Train the small multilingual + code MoE that ships in models/ (moe-edge's default model).

Stages, each reading the previous one's output under WORK (run `all` for every stage in order):

    tools/.venv/bin/python tools/train_moe.py all --work /tmp/moe-train

- `corpus`: downloads pinned Debian packages (man pages in eight languages, fortunes in six, CPython's
  standard library, Rust crate sources), renders man pages to plain text with groff, labels every document
  with its language (en de fr es it pl ru ja python rust) and domain (man fortune code), splits off a
  held-out set per language by document, and builds question/answer chats from the man pages' NAME lines.
  Writes WORK/corpus/{train,heldout}.jsonl, WORK/heldout/<lang>.txt and WORK/corpus.json (package
  checksums, document counts, sizes, the corpus checksum).
- `tokenizer`: a byte-level BPE (GPT-2 pre-tokenizer, 8192 entries, special tokens for a ChatML format)
  trained with `tokenizers` on an equal share of every language. WORK/tokenizer/.
- `train`: a Mixtral-style model from transformers' own classes (6 layers, hidden 256, 16 experts of 256,
  top-2, load-balancing loss), trained on CPU for a fixed number of steps; the batches draw every language
  equally often and mix in the chats. WORK/hf/ (safetensors checkpoint with tokenizer and chat template),
  WORK/train.json (loss curve, tokens seen, time, peak RSS).
- `evaluate`: held-out perplexity per language with transformers, scored as llama.cpp's `llama-perplexity`
  does and as `moe-edge perplexity` does (context 256, each chunk's first token replaced by BOS, the second
  half of each chunk scored). WORK/eval.json.
- `fixture` (not part of `all`): the start of each held-out text, one window long, with torch's perplexity
  over it, for moe-edge's tests (--fixture-out, default tests/fixtures/moe-edge-mini).

The same seed gives the same corpus checksum and the same token stream; see models/moe-edge-mini/README.md.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

# Debian bookworm packages, pinned; their sha256 are recorded in corpus.json
MAN_PACKAGES = {
    "en": "manpages=6.03-2",
    "de": "manpages-de=4.18.1-1",
    "fr": "manpages-fr=4.18.1-1",
    "es": "manpages-es=4.18.1-1",
    "it": "manpages-it=4.18.1-1",
    "pl": "manpages-pl=1:4.18.1-1",
    "ru": "manpages-ru=4.18.1-1",
    "ja": "manpages-ja=0.5.0.0.20221215+dfsg-1",
}
FORTUNE_PACKAGES = {
    "en": ["fortunes=1:1.99.1-7.3", "fortunes-min=1:1.99.1-7.3"],
    "de": ["fortunes-de=0.35-1"],
    "es": ["fortunes-es=1.36"],
    "it": ["fortunes-it=1.99-4.1"],
    "pl": ["fortunes-pl=0.0.20130525-3"],
    "ru": ["fortunes-ru=1.52-3.1"],
}
PYTHON_PACKAGES = ["libpython3.11-stdlib=3.11.2-6+deb12u9"]
RUST_PACKAGES = [
    "librust-regex-dev=1.7.1-1",
    "librust-regex-syntax-dev=0.6.27-1",
    "librust-serde-dev=1.0.152-2",
    "librust-clap-dev=4.0.32-1",
    "librust-rayon-dev=1.6.1-1",
    "librust-rayon-core-dev=1.10.1-1",
    "librust-syn-dev=1.0.107-1",
    "librust-anyhow-dev=1.0.69-1",
    "librust-log-dev=0.4.17-3",
    "librust-memchr-dev=2.5.0-1",
    "librust-itertools-dev=0.10.3-1",
    "librust-hashbrown-dev=0.12.3-1",
    "librust-indexmap-dev=1.9.2-1",
    "librust-bytes-dev=1.2.1-1",
    "librust-tokio-dev=1.24.2-1",
]
LANGS = ["en", "de", "fr", "es", "it", "pl", "ru", "ja", "python", "rust"]
# training text per language (bytes of UTF-8), and held-out text per language
TRAIN_CAP = 3_000_000
HELDOUT_CAP = 14_000
# "what does CMD do?" in each man-page language, for the chat samples
QUESTIONS = {
    "en": "What does {} do?",
    "de": "Was macht {}?",
    "fr": "Que fait {} ?",
    "es": "¿Qué hace {}?",
    "it": "Cosa fa {}?",
    "pl": "Co robi {}?",
    "ru": "Что делает {}?",
    "ja": "{} は何をしますか？",
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL = dict(layers=6, hidden=256, heads=8, kv_heads=4, experts=16, top_k=2, ffn=256, vocab=8192, context=256)
CHAT_SHARE = 0.08  # share of training sequences drawn from the chats


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(s):
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


def write_atomic(path, data, mode="w"):
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- corpus


def download(specs, debs):
    """apt-get download the pinned packages into `debs` (kept between runs); name -> .deb path."""
    os.makedirs(debs, exist_ok=True)
    missing = [s for s in specs if not any(f.startswith(s.split("=")[0] + "_") for f in os.listdir(debs))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, stdout=subprocess.DEVNULL)
    out = {}
    for s in specs:
        name = s.split("=")[0]
        files = [f for f in os.listdir(debs) if f.startswith(name + "_") and f.endswith(".deb")]
        if len(files) != 1:
            raise SystemExit(f"expected one .deb for {s} in {debs}, found {files}")
        out[s] = os.path.join(debs, files[0])
    return out


def extract(deb, root):
    dest = os.path.join(root, os.path.basename(deb)[: -len(".deb")])
    if not os.path.isdir(dest):
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(dest + ".part", ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", deb, dest + ".part"], check=True)
        os.rename(dest + ".part", dest)
    return dest


def render_man(path):
    """Plain text of one man page (groff, UTF-8, no overstriking); None for links and failures."""
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    except OSError:
        return None
    if raw.lstrip().startswith(b".so ") or len(raw) < 200:
        return None
    env = dict(os.environ, GROFF_NO_SGR="1", LC_ALL="C.UTF-8")
    try:
        pre = subprocess.run(["preconv", "-e", "UTF-8"], input=raw, capture_output=True, timeout=30, env=env)
        out = subprocess.run(
            ["groff", "-Tutf8", "-mandoc", "-rLL=78n", "-rcR=1", "-dAD=l", "-P-c", "-P-b", "-P-u", "-P-o"],
            input=pre.stdout, capture_output=True, timeout=30, env=env,
        )
    except subprocess.TimeoutExpired:
        return None
    text = out.stdout.decode("utf-8", "replace")
    text = re.sub(r".\x08", "", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text if len(text) > 200 else None


def name_line(text):
    """The man page's NAME line ('tar - an archiving utility', continuation lines joined) as
    (command, description), or None."""
    lines = text.splitlines()
    for i, line in enumerate(lines[1:40], start=1):
        m = re.match(r"^(\s{3,})([\w.+\-]+(?:,\s*[\w.+\-]+)*)\s+[-\u2014\u2013]+\s+(\S.{5,})$", line)
        if m:
            desc = m.group(3).strip()
            for cont in lines[i + 1 : i + 4]:
                if not cont.strip() or not cont.startswith(m.group(1)) or cont.startswith(m.group(1) + " " * 4):
                    break
                desc += " " + cont.strip()
            return m.group(2).split(",")[0].strip(), re.sub(r"\s+", " ", desc)
    return None


def read_text(path):
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def corpus(args):
    work = args.work
    debs = os.path.join(work, "debs")
    root = os.path.join(work, "extract")
    specs = list(MAN_PACKAGES.values()) + [s for v in FORTUNE_PACKAGES.values() for s in v] + PYTHON_PACKAGES + RUST_PACKAGES
    paths = download(specs, debs)
    packages = {s: dict(file=os.path.basename(p), sha256=sha256_file(p)) for s, p in paths.items()}
    trees = {s: extract(p, root) for s, p in paths.items()}
    rng = np.random.default_rng(args.seed)
    docs = []  # dict(lang, domain, name, text)

    # man pages: sections 1, 5 and 8 (commands, files, administration) first, then the rest
    for lang, spec in MAN_PACKAGES.items():
        base = os.path.join(trees[spec], "usr/share/man", "" if lang == "en" else lang)
        files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs if re.match(r"man\d", os.path.basename(d))
        )
        files = [files[i] for i in rng.permutation(len(files))]
        files.sort(key=lambda f: 0 if re.search(r"/man[158]/", f) else 1)
        taken = 0
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            for start in range(0, len(files), 64):
                if taken >= TRAIN_CAP * 0.8 + HELDOUT_CAP * 3:
                    break
                batch = files[start : start + 64]
                for f, text in zip(batch, pool.map(render_man, batch)):
                    if text:
                        name = os.path.basename(f).removesuffix(".gz")
                        if lang == "ja":
                            # groff justifies Japanese lines with runs of spaces between words
                            text = re.sub(r"(?<=\S) {2,}(?=\S)", " ", text)
                        docs.append(dict(lang=lang, domain="man", name=f"man/{lang}/{name}", text=text))
                        taken += len(text.encode())
        log(f"man {lang}: {taken} bytes")

    # fortunes: 20 cookies per document
    for lang, specs_ in FORTUNE_PACKAGES.items():
        cookies = []
        for spec in specs_:
            base = os.path.join(trees[spec], "usr/share/games/fortunes")
            for d, _, fs in sorted(os.walk(base)):
                if "/off" in d:
                    continue
                for f in sorted(fs):
                    p = os.path.join(d, f)
                    if f.endswith((".dat", ".u8")) or os.path.islink(p):
                        continue
                    for c in re.split(r"\n%\n", read_text(p)):
                        c = c.strip()
                        if 20 < len(c) < 2000:
                            cookies.append((os.path.relpath(p, base), c))
        for i in range(0, len(cookies), 20):
            group = cookies[i : i + 20]
            docs.append(dict(lang=lang, domain="fortune", name=f"fortune/{lang}/{group[0][0]}#{i}", text="\n\n".join(c for _, c in group)))
        log(f"fortunes {lang}: {len(cookies)} cookies")

    # code
    for lang, specs_, pattern in (("python", PYTHON_PACKAGES, r"\.py$"), ("rust", RUST_PACKAGES, r"\.rs$")):
        files = []
        for spec in specs_:
            for d, _, fs in sorted(os.walk(trees[spec])):
                if re.search(r"/(test|tests|idlelib|lib2to3|benches)(/|$)", d):
                    continue
                files += [os.path.join(d, f) for f in sorted(fs) if re.search(pattern, f) and os.path.isfile(os.path.join(d, f))]
        files = [files[i] for i in rng.permutation(len(files))]
        taken = 0
        for p in files:
            text = read_text(p).strip()
            if 200 < len(text) < 200_000 and taken < TRAIN_CAP + HELDOUT_CAP * 3:
                docs.append(dict(lang=lang, domain="code", name=f"code/{lang}/{os.path.relpath(p, root)}", text=text))
                taken += len(text.encode())
        log(f"code {lang}: {taken} bytes")

    # held-out split by document, per language: documents chosen by a hash of their name
    split = {"train": [], "heldout": []}
    by_lang = {lang: [] for lang in LANGS}
    for d in docs:
        by_lang[d["lang"]].append(d)
    heldout_text = {}
    for lang in LANGS:
        ds = sorted(by_lang[lang], key=lambda d: stable_hash(f"{args.seed}:{d['name']}"))
        held, size = [], 0
        for d in ds:
            if size >= HELDOUT_CAP:
                break
            # the held-out text is made of whole documents, cut at the cap
            held.append(d)
            size += len(d["text"].encode())
        held_names = {d["name"] for d in held}
        train_docs, train_size = [], 0
        for d in ds:
            if d["name"] in held_names:
                continue
            if train_size >= TRAIN_CAP:
                break
            train_docs.append(d)
            train_size += len(d["text"].encode())
        split["heldout"] += held
        split["train"] += train_docs
        text = "\n\n".join(d["text"] for d in held)
        heldout_text[lang] = text.encode()[:HELDOUT_CAP].decode("utf-8", "ignore")

    # chats from the NAME lines of the training man pages (held-out pages give held-out chats)
    chats = {"train": [], "heldout": []}
    for part in ("train", "heldout"):
        for d in split[part]:
            # commands and administration commands (sections 1 and 8)
            if d["domain"] != "man" or not re.search(r"\.[18]\w*$", d["name"]):
                continue
            nl = name_line(d["text"])
            if nl:
                cmd, desc = nl
                chats[part].append(dict(lang=d["lang"], domain="chat", name=d["name"], messages=[
                    dict(role="user", content=QUESTIONS[d["lang"]].format(cmd)),
                    dict(role="assistant", content=f"{cmd}: {desc}"),
                ]))

    out = os.path.join(work, "corpus")
    os.makedirs(out, exist_ok=True)
    os.makedirs(os.path.join(work, "heldout"), exist_ok=True)
    digest = hashlib.sha256()
    for part in ("train", "heldout"):
        lines = [json.dumps(d, ensure_ascii=False, sort_keys=True) for d in split[part] + chats[part]]
        data = "\n".join(lines) + "\n"
        digest.update(data.encode())
        write_atomic(os.path.join(out, f"{part}.jsonl"), data)
    for lang, text in heldout_text.items():
        write_atomic(os.path.join(work, "heldout", f"{lang}.txt"), text + "\n")
    stats = {}
    for part in ("train", "heldout"):
        for d in split[part]:
            s = stats.setdefault(d["lang"], {}).setdefault(part, dict(documents=0, bytes=0))
            s["documents"] += 1
            s["bytes"] += len(d["text"].encode())
    meta = dict(
        seed=args.seed,
        packages=packages,
        per_language=stats,
        chats={p: len(c) for p, c in chats.items()},
        heldout_text_bytes={lang: len(t.encode()) for lang, t in heldout_text.items()},
        corpus_sha256=digest.hexdigest(),
    )
    write_atomic(os.path.join(work, "corpus.json"), json.dumps(meta, indent=1, ensure_ascii=False))
    log(f"corpus sha256 {meta['corpus_sha256']}")
    return meta


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def render_chat(messages):
    import jinja2

    return jinja2.Template(CHAT_TEMPLATE, keep_trailing_newline=True).render(messages=messages, add_generation_prompt=False)


# ---------------------------------------------------------------- tokenizer


def tokenizer(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    docs = load_jsonl(os.path.join(args.work, "corpus", "train.jsonl"))
    # an equal share of every language, so that every script gets merges
    per_lang = {}
    for d in docs:
        if d["domain"] != "chat":
            per_lang.setdefault(d["lang"], []).append(d["text"])
    sample = []
    for lang in LANGS:
        size = 0
        for t in per_lang.get(lang, []):
            if size > 1_000_000:
                break
            sample.append(t)
            size += len(t.encode())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL["vocab"],
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", bos)]
    )
    out = os.path.join(args.work, "tokenizer")
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL["context"] * 8,
        chat_template=CHAT_TEMPLATE,
    )
    write_atomic(os.path.join(out, "tokenizer_config.json"), json.dumps(config, indent=1, ensure_ascii=False))
    log(f"tokenizer: {tok.get_vocab_size()} entries")


def load_tokenizer(work):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(work, "tokenizer", "tokenizer.json"))


# ---------------------------------------------------------------- training


def token_streams(work, tok):
    """Per language: every training document's tokens, each preceded by <|endoftext|>; plus 'chat'."""
    docs = load_jsonl(os.path.join(work, "corpus", "train.jsonl"))
    texts = {}
    for d in docs:
        key = "chat" if d["domain"] == "chat" else d["lang"]
        texts.setdefault(key, []).append(render_chat(d["messages"]) if key == "chat" else d["text"])
    streams = {}
    for key in sorted(texts):
        encs = tok.encode_batch(texts[key])  # the post-processor puts <|endoftext|> first
        streams[key] = np.concatenate([np.asarray(e.ids, np.int64) for e in encs])
    return streams


def make_model(seed):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=MODEL["vocab"],
        hidden_size=MODEL["hidden"],
        num_hidden_layers=MODEL["layers"],
        num_attention_heads=MODEL["heads"],
        num_key_value_heads=MODEL["kv_heads"],
        intermediate_size=MODEL["ffn"],
        num_local_experts=MODEL["experts"],
        num_experts_per_tok=MODEL["top_k"],
        max_position_embeddings=MODEL["context"] * 8,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.02,
    )
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def train(args):
    import torch

    torch.set_num_threads(os.cpu_count())
    tok = load_tokenizer(args.work)
    streams = token_streams(args.work, tok)
    keys = [k for k in LANGS if k in streams]
    probs = np.array([(1 - CHAT_SHARE) / len(keys)] * len(keys) + [CHAT_SHARE])
    keys.append("chat")
    log("training tokens per stream: " + ", ".join(f"{k} {len(streams[k])}" for k in keys))
    cfg, model = make_model(args.seed)
    model.set_experts_implementation("grouped_mm")
    model.train()
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    ctx, batch = MODEL["context"], args.batch
    warmup = max(1, args.steps // 20)
    curve = []
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = []
        for k in rng.choice(len(keys), size=batch, p=probs):
            s = streams[keys[k]]
            o = int(rng.integers(0, len(s) - ctx - 1))
            rows.append(s[o : o + ctx + 1])
        x = torch.from_numpy(np.stack(rows))
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone().contiguous(), use_cache=False)
        # transformers shifts the labels itself; out.loss includes the load-balancing term
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = float(out.loss) - cfg.router_aux_loss_coef * float(out.aux_loss)
        curve.append(dict(step=step + 1, lm_loss=round(lm, 4), aux_loss=round(float(out.aux_loss), 4), lr=lr, seconds=round(time.time() - t0, 1)))
        if (step + 1) % 20 == 0 or step == 0:
            log(f"step {step + 1}/{args.steps} lm loss {lm:.3f} aux {float(out.aux_loss):.3f} lr {lr:.2e} {time.time() - t0:.0f} s")
    seconds = time.time() - t0
    out_dir = os.path.join(args.work, "hf")
    model.eval()
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.work, "tokenizer", f), out_dir)
    gen = dict(bos_token_id=0, eos_token_id=[2, 0], pad_token_id=0)
    write_atomic(os.path.join(out_dir, "generation_config.json"), json.dumps(gen, indent=1))
    meta = dict(
        seed=args.seed, steps=args.steps, batch=batch, context=ctx, lr=args.lr, parameters=params, model=MODEL,
        tokens_seen=args.steps * batch * ctx, seconds=round(seconds, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        threads=torch.get_num_threads(), versions=versions(), curve=curve,
    )
    write_atomic(os.path.join(args.work, "train.json"), json.dumps(meta, indent=1))
    log(f"trained {args.steps} steps, {meta['tokens_seen']} tokens in {seconds:.0f} s, peak RSS {meta['peak_rss_mb']} MB")


def versions():
    import tokenizers
    import torch
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, tokenizers=tokenizers.__version__, numpy=np.__version__)


# ---------------------------------------------------------------- evaluation


def chunk_nll(model, ids, ctx, bos):
    """llama-perplexity's scheme: chunks of `ctx` tokens, first token replaced by BOS, the tokens after
    the first half scored. Returns the negative log-likelihoods of the scored tokens."""
    import torch

    nll = []
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = torch.tensor([[bos] + ids[start + 1 : start + ctx]])
        with torch.no_grad():
            logits = model(input_ids=chunk, use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        first = ctx // 2
        target = chunk[0, first + 1 :]
        nll += (-logp[first : ctx - 1].gather(1, target[:, None])[:, 0]).tolist()
    return nll


def load_checkpoint(work):
    """The trained checkpoint in eval mode, with transformers' eager (one expert at a time) MoE."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf"), attn_implementation="eager").eval()
    model.set_experts_implementation("eager")
    return model


def evaluate(args):
    model = load_checkpoint(args.work)
    tok = load_tokenizer(args.work)
    bos = tok.token_to_id("<|endoftext|>")
    result = {}
    total = []
    for lang in LANGS:
        text = open(os.path.join(args.work, "heldout", f"{lang}.txt"), encoding="utf-8").read()
        ids = tok.encode(text).ids
        nll = chunk_nll(model, ids, args.context, bos)
        total += nll
        result[lang] = dict(tokens=len(ids), scored=len(nll), perplexity=math.exp(sum(nll) / len(nll)), bytes=len(text.encode()))
        log(f"{lang}: {len(ids)} tokens, perplexity {result[lang]['perplexity']:.3f}")
    result["all"] = dict(scored=len(total), perplexity=math.exp(sum(total) / len(total)))
    meta = dict(context=args.context, scheme="llama-perplexity (BOS first, second half scored)", per_language=result, versions=versions())
    write_atomic(os.path.join(args.work, "eval.json"), json.dumps(meta, indent=1))
    log(f"all: perplexity {result['all']['perplexity']:.3f}")


def fixture(args):
    """A small test fixture: the start of each language's held-out text (one window of --context
    tokens and a little more) and torch's perplexity over it, written to --fixture-out."""
    model = load_checkpoint(args.work)
    tok = load_tokenizer(args.work)
    bos = tok.token_to_id("<|endoftext|>")
    out = args.fixture_out
    os.makedirs(out, exist_ok=True)
    result = {}
    for lang in LANGS:
        text = open(os.path.join(args.work, "heldout", f"{lang}.txt"), encoding="utf-8").read()
        # the shortest prefix of whole lines that gives one window
        lines, cut = text.splitlines(keepends=True), ""
        for line in lines:
            cut += line
            if len(tok.encode(cut).ids) > args.context + 8:
                break
        ids = tok.encode(cut).ids
        nll = chunk_nll(model, ids, args.context, bos)
        write_atomic(os.path.join(out, f"{lang}.txt"), cut)
        result[lang] = dict(tokens=len(ids), scored=len(nll), perplexity=math.exp(sum(nll) / len(nll)))
    meta = dict(context=args.context, scheme="llama-perplexity (BOS first, second half scored)", per_language=result, versions=versions())
    write_atomic(os.path.join(out, "torch.json"), json.dumps(meta, indent=1))
    log(json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["corpus", "tokenizer", "train", "evaluate", "fixture", "all"])
    ap.add_argument("--work", required=True, help="working directory (downloads, corpus, checkpoint)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=1600, help="optimizer steps (the fixed training budget)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--context", type=int, default=MODEL["context"], help="evaluation chunk length")
    ap.add_argument("--fixture-out", default="tests/fixtures/moe-edge-mini", help="where `fixture` writes")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    stages = ["corpus", "tokenizer", "train", "evaluate"] if args.stage == "all" else [args.stage]
    for s in stages:
        t0 = time.time()
        globals()[s](args)
        log(f"{s}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
