#!/usr/bin/env python3
"""Chat-template fixtures rendered by transformers' own apply_chat_template, for moe-edge's tests.

Writes tests/fixtures/chat/:
  tokenizer.json    a byte-level BPE tokenizer (256 byte tokens, no merges) plus the special tokens
                    of the four template styles, so that any text encodes and ids are comparable;
  <style>.jinja     four templates written for these fixtures in the styles of ChatML (Qwen),
                    Llama-3 headers, Mistral/Mixtral [INST] and Granite roles;
  cases.json        per style and conversation: the messages, add_generation_prompt, and
                    transformers' rendered text and token ids.

    tools/.venv/bin/python tools/chat_fixtures.py
"""
import json
import pathlib

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat"

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<s>", "</s>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"]

TEMPLATES = {
    "chatml": (None, "<|im_end|>", """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role != 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""),
    "mistral": ("<s>", "</s>", """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""),
    "granite": ("<|end_of_text|>", "<|end_of_text|>", """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Knowledge Cutoff Date: April 2024. You are Granite, developed by IBM." %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\\n' }}
{%- for message in loop_messages %}
    {{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'].strip() + '<|end_of_text|>\\n' }}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_of_role|>assistant<|end_of_role|>' }}
    {%- endif %}
{%- endfor %}
"""),
}

CONVERSATIONS = {
    "system_and_user": ([("system", "You answer in one line."), ("user", "What does tar do?")], True),
    "multi_turn": ([("system", "Be brief."), ("user", "Hallo, wie geht's?"),
                    ("assistant", "Gut, danke! Und dir?"), ("user", "Größe von 日本 und 🙂?")], True),
    "no_system": ([("user", "  spaces around  ")], True),
    "closed_exchange": ([("user", "ls -la"), ("assistant", "lists files, long format, with hidden ones")], False),
}


def byte_level_tokenizer():
    # GPT-2's byte-to-character map: every byte is one printable character, one token
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return tok


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer().save(str(OUT / "tokenizer.json"))
    cases = []
    for style, (bos, eos, template) in TEMPLATES.items():
        (OUT / f"{style}.jinja").write_text(template)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(OUT / "tokenizer.json"), bos_token=bos, eos_token=eos)
        for name, (turns, gen) in CONVERSATIONS.items():
            messages = [{"role": r, "content": c} for r, c in turns]
            text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen,
                                           tokenize=False)
            ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen,
                                          tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            cases.append({"style": style, "case": name, "bos_token": bos, "eos_token": eos,
                          "add_generation_prompt": gen, "messages": messages, "text": text, "ids": list(ids)})
    (OUT / "cases.json").write_text(json.dumps({"transformers": transformers.__version__, "cases": cases},
                                               ensure_ascii=False, indent=1) + "\n")
    print(f"{len(cases)} cases written to {OUT}")


if __name__ == "__main__":
    main()
