"""Hugging Face tokenizer folders: ``tokenizer.json`` and the chat template, read as transformers.

:func:`load` reads a folder written by transformers' ``save_pretrained`` (or downloaded from
the Hub): ``tokenizer.json`` runs through Hugging Face's ``tokenizers`` library, so the ids are
the ones transformers gives; ``tokenizer_config.json`` names the special tokens; the chat
template (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``) is
rendered with jinja2 the way transformers renders it: a sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``,
a ``tojson`` that does not escape HTML, and the special tokens (``bos_token``, ...) as
variables. Needs the ``hf`` extra (``pip install "lora-jax[hf]"``: tokenizers, jinja2).

GGUF files carry their own tokenizer (:mod:`lora_jax.models.tokenizer`, used by
:mod:`lora_jax.models.gguf`); this module is for Hugging Face folders.

Example (the folder is one of the test suite's)::

    tok = load("tests/data/tokenizer/bytelevel")
    ids = tok.encode("Hello world")            # with the BOS its post-processor adds
    tok.decode(ids, skip_special_tokens=True)  # 'Hello world'
    tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import datetime
import json
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a chat template sees as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
# transformers' apply_chat_template options that change the output outside the template; here
# they would silently become template variables, so they are refused.
UNSUPPORTED_OPTIONS = ("continue_final_message", "return_assistant_tokens_mask",
                       "sanitize_control_tokens", "return_dict", "return_tensors", "padding",
                       "truncation", "max_length", "tokenizer_kwargs", "chat_template")
# Names a message's reasoning may come under; templates read the first (transformers' aliases).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"lora_jax.models.hf_tokenizer needs the {module!r} package: "
                          'pip install "lora-jax[hf]" (tokenizers, jinja2)') from e


def _token_text(value: Any, key: str, where: str) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: {key} must be a string or an object with a 'content' string, "
                     f"got {value!r}")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


class HFTokenizer:
    """A Hugging Face tokenizer: ``tokenizers``' backend plus the folder's config.

    Attributes:
      backend: the ``tokenizers.Tokenizer`` read from ``tokenizer.json``.
      special_tokens: ``{"bos_token": "<s>", ...}``, the named special tokens that are set.
      chat_template: the Jinja source, or None.
      folder: where it was read from (for error messages).
    """

    def __init__(self, backend: Any, *, special_tokens: Mapping[str, str],
                 chat_template: str | None = None, clean_up_tokenization_spaces: bool = False,
                 folder: str = "<memory>"):
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.folder = folder
        for name, token in self.special_tokens.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"{folder}: {name} {token!r} is not in tokenizer.json's "
                                 "vocabulary or added tokens")
        self._template = None

    # ---------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (transformers' len(tok))."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def id_bound(self) -> int:
        """One more than the largest id (``vocab_size`` unless the ids have holes)."""
        ids = self.backend.get_vocab(with_added_tokens=True).values()
        return max(self.vocab_size, max(ids, default=-1) + 1)

    def token_id(self, name: str) -> int | None:
        """The id of the special token ``name`` (``"bos_token"``, ...), or None if unset."""
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self.token_id("unk_token")

    def check_vocab(self, model_vocab: int) -> None:
        """Raises ValueError if an id this tokenizer produces would not index ``model_vocab`` rows.

        A model's vocabulary may be larger than its tokenizer's (padded to a multiple of 64,
        say), never smaller: a larger id would index past the embedding, which XLA clamps
        silently instead of failing.
        """
        try:
            rows = operator.index(model_vocab)
        except TypeError:
            rows = 0
        if isinstance(model_vocab, bool) or rows < 1:
            raise ValueError(f"check_vocab: model_vocab must be a positive int, "
                             f"got {model_vocab!r}")
        if self.id_bound > rows:
            raise ValueError(f"{self.folder}: the tokenizer has {self.vocab_size} tokens (ids up "
                             f"to {self.id_bound - 1}) but the model's vocabulary has "
                             f"{rows} rows: a tokenizer for another model?")

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs the post-processor (BOS/EOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (a list of ints or a 1-D integer array)."""
        ids = [int(i) for i in getattr(ids, "tolist", lambda: ids)()]
        bad = [i for i in ids if not 0 <= i < self.id_bound]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.id_bound})")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and self._model_type() != "BPE":
            # transformers skips this cleanup for BPE models (it would corrupt their spaces).
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","),
                                  (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"),
                                  (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def _model_type(self) -> str:
        return json.loads(self.backend.to_str())["model"]["type"]

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            **variables: Any) -> str | list[int]:
        """Renders a conversation with the folder's chat template, as transformers does.

        Args:
          messages: dicts with ``role`` and ``content`` (keys whose value is None are dropped).
          add_generation_prompt: end with the header of an assistant turn.
          tokenize: return ids (the rendered text encoded without adding special tokens,
            since the template writes them), else the text.
          **variables: more template variables (``tools``, ``documents``, ``enable_thinking``,
            ...); they override the special tokens of the same name.
        """
        unsupported = sorted(set(variables) & set(UNSUPPORTED_OPTIONS))
        if unsupported:
            raise TypeError(f"apply_chat_template: {unsupported} are transformers options this "
                            "reader does not implement (they would otherwise reach the template "
                            "as variables and change nothing)")
        if self.chat_template is None:
            raise ValueError(f"{self.folder}: no chat template (neither chat_template.jinja nor "
                             "a chat_template in tokenizer_config.json)")
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError("apply_chat_template: messages must be a list of dicts, got "
                            f"{type(messages).__name__}")
        if not messages:
            raise ValueError("apply_chat_template: the conversation is empty")
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TypeError(f"apply_chat_template: messages[{i}] must be a dict, got "
                                f"{type(message).__name__}")
            plain = {k: _plain(v, f"messages[{i}][{k!r}]") for k, v in message.items()
                     if v is not None}
            reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
            if reasoning is not None:
                plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
            chat.append(plain)
        context = {"tools": None, "documents": None, **self.special_tokens,
                   **{k: _plain(v, k) for k, v in variables.items()}}
        text = self._compiled().render(messages=chat, add_generation_prompt=add_generation_prompt,
                                       **context)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _compiled(self):
        if self._template is None:
            assert self.chat_template is not None  # apply_chat_template checked it
            self._template = compile_chat_template(self.chat_template)
        return self._template


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` in plain JSON types: what a sandboxed template may see."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):                      # subclasses (enums, numpy scalars)
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _plain(value.item(), where)
    raise TypeError(f"apply_chat_template: {where} is a {type(value).__name__}; a chat template "
                    "sees only strings, numbers, booleans, None, lists and dicts")


def compile_chat_template(source: str):
    """A jinja2 template in transformers' chat-template environment."""
    _require("jinja2")
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    import jinja2.utils

    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2 >= 3.1.6 (older versions have sandbox "
                          f"escapes); installed: {jinja2.__version__}")

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` without underscore attributes (no reach into Python internals)."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template cannot set the underscore attribute {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    template_globals: dict[str, Any] = {
        "raise_exception": raise_exception, "strftime_now": strftime_now,
        "dict": lambda *a, **k: dict(*a, **k), "namespace": Namespace}
    env.globals.update(template_globals)
    return env.from_string(source)


def load(folder: str | os.PathLike, *, vocab_size: int | None = None) -> HFTokenizer:
    """Reads a Hugging Face tokenizer folder.

    Args:
      folder: holds ``tokenizer.json``; ``tokenizer_config.json`` (special tokens,
        ``chat_template``) and ``chat_template.jinja`` are read when present. BOS/EOS come
        from tokenizer.json's post-processor, as transformers' generic class does; a
        model-specific ``tokenizer_class`` whose ``add_bos_token``/``add_eos_token`` disagree
        with it is refused.
      vocab_size: the model's vocabulary size; if given, :meth:`HFTokenizer.check_vocab`
        runs at once.
    """
    tokenizers = _require("tokenizers")
    where = os.fspath(folder)
    if not os.path.isdir(where):
        raise FileNotFoundError(f"hf_tokenizer.load: {where!r} is not a folder")
    path = os.path.join(where, "tokenizer.json")
    if not os.path.isfile(path):
        present = sorted(os.listdir(where))
        hint = (" (tokenizer.model alone is a SentencePiece file: save the tokenizer with "
                "transformers' PreTrainedTokenizerFast to get tokenizer.json)"
                if "tokenizer.model" in present else "")
        raise FileNotFoundError(f"hf_tokenizer.load: {where!r} has no tokenizer.json{hint}; "
                                f"it holds {present[:10]}")
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"{path} is not a tokenizers file: {e}") from e
    config_path = os.path.join(where, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = _token_text(config.get(name), name, config_path)
        if token is not None:
            special[name] = token
    _check_added_tokens(backend, config, config_path)
    template = _chat_template(where, config, config_path)
    tok = HFTokenizer(backend, special_tokens=special, chat_template=template,
                      clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces")),
                      folder=where)
    _check_post_processor(tok, config, config_path)
    if vocab_size is not None:
        tok.check_vocab(vocab_size)
    return tok


def _check_added_tokens(backend: Any, config: dict, config_path: str) -> None:
    """The config's added_tokens_decoder must agree with tokenizer.json: transformers would add
    a token missing from it, and the ids would then differ from this reader's."""
    added = config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise ValueError(f"{config_path}: added_tokens_decoder must be an object {{id: token}}")
    for key, entry in added.items():
        content = _token_text(entry, f"added_tokens_decoder[{key!r}]", config_path)
        found = backend.token_to_id(content) if content is not None else None
        if not str(key).isdigit() or found != int(key):
            has = "not at all" if found is None else f"as id {found}"
            raise ValueError(f"{config_path}: added_tokens_decoder[{key!r}] is {content!r}, which "
                             f"tokenizer.json has {has}; transformers would add or move it, so "
                             "the ids would differ")


def _chat_template(folder: str, config: dict, config_path: str) -> str | None:
    """chat_template.jinja if present (as transformers prefers it), else the config's."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as fh:
            return fh.read()
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{config_path}: chat_template is a list without a 'default' template "
                         f"(names: {sorted(map(str, named))})")
    raise ValueError(f"{config_path}: chat_template must be a string or a list of "
                     f"{{name, template}}, got {type(template).__name__}")


# Classes that transformers loads as the folder's tokenizer.json says (their post-processor
# decides BOS/EOS); model-specific classes (LlamaTokenizer, ...) rebuild it from the config.
GENERIC_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")


def _check_post_processor(tok: HFTokenizer, config: dict, config_path: str) -> None:
    """Refuses a config whose add_bos_token/add_eos_token a model-specific class would apply
    differently from tokenizer.json's post-processor (the ids would differ from transformers')."""
    cls = config.get("tokenizer_class")
    if cls in GENERIC_CLASSES:
        return  # tokenizer.json's post-processor decides (tests/data/tokenizer/bytelevel_eos)
    probe = tok.encode("a", add_special_tokens=True)
    plain = tok.encode("a", add_special_tokens=False)
    does = {"add_bos_token": probe[:1] == [tok.bos_id] and plain[:1] != [tok.bos_id],
            "add_eos_token": probe[-1:] == [tok.eos_id] and plain[-1:] != [tok.eos_id]}
    for key, actual in does.items():
        if key in config and bool(config[key]) != actual:
            raise ValueError(
                f"{config_path}: {key} is {config[key]!r}, but tokenizer.json's post-processor "
                f"{'adds' if actual else 'does not add'} that token; transformers' {cls} would "
                "follow the config, so the ids would differ: make the two agree")
