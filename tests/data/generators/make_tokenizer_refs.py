"""Builds two tiny Hugging Face tokenizers and records transformers' outputs for them.

Run with the reference environment (transformers 5.25, tokenizers), from the repository root:

    /work/refenv/bin/python tests/data/generators/make_tokenizer_refs.py

Writes tests/data/tokenizer/{bytelevel,metaspace}/ (the folders `save_pretrained` writes),
bytelevel_eos/ (bytelevel's files with `add_bos_token: false, add_eos_token: true` in its
config, which makes transformers rebuild the post-processor: EOS, no BOS), and
tests/data/tokenizer/refs.json: per tokenizer, transformers' ids for `encode` with and without
special tokens, `decode` with and without skipping them, the rendered chat strings and their
ids, and the bos/eos/pad ids. tests/test_hf_tokenizer.py checks lora_jax against them.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

OUT = pathlib.Path(__file__).resolve().parents[1] / "tokenizer"

CORPUS = [
    "Parameter-efficient fine-tuning trains a low-rank update of frozen weights.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps.",
    "JAX transforms functions: grad, jit, vmap and scan compose freely.",
    "Naïve café owners déjà vu: Größe, straße, smörgåsbord, jalapeño.",
    "Числа и слова: один, два, три. 日本語のテキストも少し。 Emoji: 🙂🚀",
    "    indented code\n\tdef f(x):\n\t\treturn x * 2\n\n",
    "Numbers 1234567890 and 3.14159, dates 2024-05-01, and URLs https://example.org/a?b=c.",
] * 20

# Varied inputs: unicode, whitespace runs, special tokens inside text, the empty string.
STRINGS = [
    "",
    "Hello world",
    " leading space",
    "trailing space ",
    "two  spaces,   three,\t\ttabs\n\nnewlines\r\n",
    "Naïve café, Größe, 日本語, 🙂🚀 and unseen ☃ chars",
    "fine-tuning with LoRA: r=8, alpha=16!",
    "<s>already a special token</s> inside text",
    "<|begin_of_text|>user<|eot_id|>",
    "\u00a0non-breaking\u2003em space",
    "x" * 40,
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a café in Größe.  Two  spaces."},
    {"role": "assistant", "content": "None 🙂"},
    {"role": "user", "content": "Again?", "name": None},
]

# Llama-3 style: byte-level BPE, a BOS added by the post-processor, header tokens.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Gemma style: Metaspace (SentencePiece-like) Unigram; whitespace control by trim_blocks and
# lstrip_blocks, a namespace, loop controls, tojson and strftime_now (only its length, so the
# reference does not depend on the date).
GEMMA_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if (message['role'] == 'user') != (ns.turns % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}
    {% endif %}
    {% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
<start_of_turn>{{ role }}
{{ message['content'] | trim }}<end_of_turn>
    {% set ns.turns = ns.turns + 1 %}
{% endfor %}
{% if add_generation_prompt %}
<start_of_turn>model
{% endif %}
{{ '<!-- ' ~ (strftime_now('%Y') | length) ~ ' ' ~ ({'k': 'é'} | tojson) ~ ' -->' }}"""


def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|pad|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = GEMMA_TEMPLATE
    return fast


def record(folder: pathlib.Path) -> dict:
    tok = AutoTokenizer.from_pretrained(folder)  # read back as a user would
    out: dict = {"class": type(tok).__name__, "len": len(tok), "bos_id": tok.bos_token_id,
                 "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "strings": []}
    for s in STRINGS:
        with_special = tok.encode(s, add_special_tokens=True)
        plain = tok.encode(s, add_special_tokens=False)
        out["strings"].append({
            "text": s, "ids": with_special, "ids_plain": plain,
            "decoded": tok.decode(with_special, skip_special_tokens=False),
            "decoded_skip": tok.decode(with_special, skip_special_tokens=True)})
    chats = []
    for messages in (MESSAGES, MESSAGES[1:2]):
        for gen in (False, True):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                          return_dict=False)
            chats.append({"messages": messages, "add_generation_prompt": gen, "text": text,
                          "ids": list(ids)})
    out["chats"] = chats
    return out


def main():
    refs = {}
    for name, build in (("bytelevel", byte_level), ("metaspace", metaspace)):
        folder = OUT / name
        build().save_pretrained(folder)
        refs[name] = record(folder)
    eos_folder = OUT / "bytelevel_eos"
    shutil.rmtree(eos_folder, ignore_errors=True)
    shutil.copytree(OUT / "bytelevel", eos_folder)
    config = json.loads((eos_folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (eos_folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    refs["bytelevel_eos"] = record(eos_folder)
    (OUT / "refs.json").write_text(json.dumps(refs, indent=1, ensure_ascii=False) + "\n")
    for name, r in refs.items():
        print(name, r["class"], r["len"], r["bos_id"], r["eos_id"], r["pad_id"])
        print(repr(r["chats"][1]["text"]))


if __name__ == "__main__":
    main()
