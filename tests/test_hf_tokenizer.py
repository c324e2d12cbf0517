"""lora_jax.models.hf_tokenizer against transformers' own outputs.

tests/data/tokenizer/refs.json holds transformers 5.25's ids, decoded strings and rendered chat
templates for three tiny tokenizers (made by tests/data/generators/make_tokenizer_refs.py): a
byte-level BPE (Llama-3/Qwen style), a Metaspace Unigram (SentencePiece-like, Llama-2/Gemma
style), and the first with add_bos_token/add_eos_token in its config.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil

import pytest

pytest.importorskip("tokenizers")
jinja2 = pytest.importorskip("jinja2")

from lora_jax.models import hf_tokenizer  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent / "data" / "tokenizer"
REFS = json.loads((DATA / "refs.json").read_text())
NAMES = sorted(REFS)


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    return request.param, hf_tokenizer.load(DATA / request.param), REFS[request.param]


def test_references_cover_the_cases():
    assert NAMES == ["bytelevel", "bytelevel_eos", "metaspace"]
    texts = [s["text"] for s in REFS["bytelevel"]["strings"]]
    assert "" in texts and any("  " in t for t in texts) and any("<s>" in t for t in texts)
    assert any(ord(c) > 0xFFFF for t in texts for c in t)   # beyond the BMP (emoji)


def test_special_ids_and_size(case):
    _, tok, ref = case
    assert (len(tok), tok.bos_id, tok.eos_id, tok.pad_id) == (
        ref["len"], ref["bos_id"], ref["eos_id"], ref["pad_id"])


def test_encode_matches_transformers(case):
    name, tok, ref = case
    for s in ref["strings"]:
        assert tok.encode(s["text"]) == s["ids"], (name, s["text"])
        assert tok.encode(s["text"], add_special_tokens=False) == s["ids_plain"], (name, s["text"])


def test_decode_matches_transformers(case):
    name, tok, ref = case
    for s in ref["strings"]:
        assert tok.decode(s["ids"]) == s["decoded"], (name, s["text"])
        skipped = tok.decode(s["ids"], skip_special_tokens=True)
        assert skipped == s["decoded_skip"], (name, s["text"])


def test_chat_template_matches_transformers(case):
    name, tok, ref = case
    for chat in ref["chats"]:
        gen = chat["add_generation_prompt"]
        text = tok.apply_chat_template(chat["messages"], add_generation_prompt=gen, tokenize=False)
        assert text == chat["text"], (name, gen)
        assert tok.apply_chat_template(chat["messages"], add_generation_prompt=gen) == chat["ids"]


def test_the_references_differ_where_options_differ():
    """Each option the tests compare changes the output, so a dropped option would be seen."""
    chats = REFS["metaspace"]["chats"]
    assert chats[0]["text"] != chats[1]["text"]              # add_generation_prompt
    s = REFS["metaspace"]["strings"][1]
    assert s["ids"] != s["ids_plain"] and s["decoded"] != s["decoded_skip"]
    # Without trim_blocks/lstrip_blocks the Gemma-style template renders other whitespace.
    raw = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    raw.globals.update(strftime_now=lambda f: "2026", raise_exception=None)
    tok = hf_tokenizer.load(DATA / "metaspace")
    assert tok.chat_template is not None
    plain = raw.from_string(tok.chat_template).render(
        messages=chats[0]["messages"][1:], add_generation_prompt=False, **tok.special_tokens)
    assert plain != chats[0]["text"]


def test_template_functions():
    tok = hf_tokenizer.load(DATA / "bytelevel")
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    gemma = hf_tokenizer.load(DATA / "metaspace")
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        gemma.apply_chat_template([{"role": "assistant", "content": "x"}])
    before = datetime.datetime.now().strftime("%Y-%m-%d")
    tok.chat_template = "{{ strftime_now('%Y-%m-%d') }}|{{ eos_token }}|{{ {'a': 'é<'} | tojson }}"
    tok._template = None
    got = tok.apply_chat_template(user, tokenize=False)
    after = datetime.datetime.now().strftime("%Y-%m-%d")
    assert got.split("|")[0] in (before, after)
    assert got.split("|", 1)[1] == '<|eot_id|>|{"a": "é<"}'
    tok.chat_template = "{{ eos_token }}"                       # variables override tokens
    tok._template = None
    assert tok.apply_chat_template(user, tokenize=False, eos_token="E") == "E"


def test_template_is_sandboxed():
    tok = hf_tokenizer.load(DATA / "bytelevel")
    user = [{"role": "user", "content": "hi"}]
    tok.chat_template = "{% set ns = namespace() %}{% set ns._x = 1 %}"
    with pytest.raises(jinja2.exceptions.SecurityError, match="_x"):
        tok.apply_chat_template(user, tokenize=False)
    tok.chat_template, tok._template = "{{ messages.append(1) }}", None
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(user, tokenize=False)


def test_messages_are_plain_data():
    tok = hf_tokenizer.load(DATA / "bytelevel")
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\]"):
        tok.apply_chat_template([{"role": "user", "content": object()}])
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match="list of dicts"):
        tok.apply_chat_template({"role": "user", "content": "hi"})


def copy_folder(tmp_path, name="bytelevel", config=None):
    folder = tmp_path / name
    shutil.copytree(DATA / name, folder)
    if config is not None:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        hf_tokenizer.load(tmp_path / "missing")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*SentencePiece"):
        hf_tokenizer.load(tmp_path / "sp")
    folder = copy_folder(tmp_path, config={"bos_token": "<nope>"})
    with pytest.raises(ValueError, match="bos_token '<nope>' is not in"):
        hf_tokenizer.load(folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        hf_tokenizer.load(folder)


def test_vocab_larger_than_the_model(tmp_path):
    tok = hf_tokenizer.load(DATA / "bytelevel")
    tok.check_vocab(len(tok))
    tok.check_vocab(len(tok) + 64)                    # a padded embedding is fine
    with pytest.raises(ValueError, match=f"has {len(tok)} tokens .* has {len(tok) - 1} rows"):
        tok.check_vocab(len(tok) - 1)
    with pytest.raises(ValueError, match="has 400 tokens"):
        hf_tokenizer.load(DATA / "bytelevel", vocab_size=128)
    with pytest.raises(ValueError, match="positive int"):
        tok.check_vocab(0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(tok)])


def test_chat_template_sources(tmp_path):
    folder = copy_folder(tmp_path)
    source = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    assert hf_tokenizer.load(folder).chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        hf_tokenizer.load(folder).apply_chat_template([{"role": "user", "content": "x"}])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for value, want in ((source, source),
                        ([{"name": "tool_use", "template": "t"},
                          {"name": "default", "template": source}], source)):
        config["chat_template"] = value
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        assert hf_tokenizer.load(folder).chat_template == want
    config["chat_template"] = [{"name": "tool_use", "template": "t"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="without a 'default'"):
        hf_tokenizer.load(folder)


def test_model_specific_class_with_disagreeing_flags(tmp_path):
    """A LlamaTokenizer-class config whose add_eos_token the post-processor does not apply
    would give other ids in transformers: refused, naming the key."""
    folder = copy_folder(tmp_path, config={"tokenizer_class": "LlamaTokenizer",
                                           "add_eos_token": True})
    with pytest.raises(ValueError, match="add_eos_token is True"):
        hf_tokenizer.load(folder)
    agreeing = copy_folder(tmp_path, "metaspace", {"tokenizer_class": "GemmaTokenizer",
                                                   "add_bos_token": True, "add_eos_token": True})
    assert hf_tokenizer.load(agreeing).encode("a")[-1] == REFS["metaspace"]["eos_id"]


def test_added_tokens_must_agree_with_tokenizer_json(tmp_path):
    """transformers adds a config token that tokenizer.json lacks (new ids): refused here."""
    tok = hf_tokenizer.load(copy_folder(tmp_path, "metaspace", {"added_tokens_decoder": {
        "4": {"content": "<start_of_turn>", "special": True}}}))
    assert tok.encode("<start_of_turn>", add_special_tokens=False) == [4]
    for n, entry in enumerate(({"399": {"content": "<tool>", "special": True}},  # absent
                               {"7": {"content": "<start_of_turn>", "special": True}})):  # moved
        folder = copy_folder(tmp_path / f"case{n}", "metaspace", {"added_tokens_decoder": entry})
        with pytest.raises(ValueError, match=r"added_tokens_decoder\[.*the ids would differ"):
            hf_tokenizer.load(folder)


def test_unsupported_transformers_options_are_refused():
    tok = hf_tokenizer.load(DATA / "bytelevel")
    with pytest.raises(TypeError, match="continue_final_message"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], continue_final_message=True)


def test_generation_tag_renders_its_body():
    """Assistant-mask templates ({% generation %}) render as transformers renders them."""
    tok = hf_tokenizer.load(DATA / "bytelevel")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                         "{% generation %}{{ m['content'] }}{% endgeneration %}"
                         "{% else %}{{ m['content'] }}{% endif %}|{% endfor %}")
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "q|a|"


def test_check_vocab_takes_any_integer():
    np = pytest.importorskip("numpy")
    tok = hf_tokenizer.load(DATA / "metaspace")
    tok.check_vocab(np.int64(len(tok)))
    with pytest.raises(ValueError, match="positive int"):
        tok.check_vocab(True)
    with pytest.raises(ValueError, match="positive int"):
        tok.check_vocab(159.0)
    assert tok.id_bound == len(tok) == REFS["metaspace"]["len"]
