"""GPT-2-style byte-level BPE, read from a GGUF file's ``tokenizer.ggml.*`` metadata.

Encoding follows Hugging Face ``tokenizers`` (ByteLevel BPE) and llama.cpp's ``llm_tokenizer_bpe``:

1. special tokens (control tokens such as ``<|im_start|>``) are cut out when ``special=True``;
2. pre-tokenization splits the text into words. For ``tokenizer.ggml.pre`` "smollm" (also
   "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva") every numeric
   character is a word of its own (``\\p{N}``), then each piece is split by GPT-2's pattern
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``;
   for "gpt2"/"default" only the GPT-2 pattern applies;
3. each word's UTF-8 bytes are mapped to printable characters (GPT-2's ``bytes_to_unicode``)
   and merged pairwise, lowest merge rank first.

The standard library's ``re`` has no ``\\p{L}``/``\\p{N}``, so the GPT-2 pattern is matched
by a small scanner over ``unicodedata`` categories (``L*`` letters, ``N*`` numbers, and
``str.isspace`` minus U+001C..U+001F for ``\\s``) that takes the same alternatives in the same
order, with no dependency on the ``regex`` package; ``tests/test_llama.py`` checks it against
``regex`` where that package is installed.

>>> tok = Tokenizer(["a", "b", "ab", "Ġ", "Ġab", "<s>"], ["a b", "Ġ ab"], special=["<s>"])
>>> tok.encode("ab ab<s>", special=True)
[2, 4, 5]
>>> tok.decode([2, 4, 5])
'ab ab<s>'
"""

from __future__ import annotations

import functools
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsInt

# llama.cpp pre-tokenizer names whose first step isolates every \p{N} character
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2 = {"gpt2", "default", "mpt", "olmo", "jais"}
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values for special tokens


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _kind(c: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'o' anything else (the pattern's classes)."""
    if c.isspace() and not "\x1c" <= c <= "\x1f":
        return "s"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "o"


def split_gpt2(text: str) -> list[str]:
    """Splits ``text`` like GPT-2's pre-tokenizer pattern (see the module docstring).

    >>> split_gpt2("Hello world's  2024!\\n")
    ['Hello', ' world', "'s", ' ', ' 2024', '!', '\\n']
    """
    kinds = [_kind(c) for c in text]
    n, i, out = len(text), 0, []
    while i < n:
        c = text[i]
        if c == "'":
            hit = next((s for s in _CONTRACTIONS if text.startswith(s, i + 1)), None)
            if hit:
                out.append(text[i : i + 1 + len(hit)])
                i += 1 + len(hit)
                continue
        # ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+', in this order
        start = i + 1 if c == " " and i + 1 < n and kinds[i + 1] != "s" else i
        kind = kinds[start]
        if kind != "s":
            j = start + 1
            while j < n and kinds[j] == kind:
                j += 1
            out.append(text[i:j])
            i = j
            continue
        # '\s+(?!\S)' then '\s+'
        j = i + 1
        while j < n and kinds[j] == "s":
            j += 1
        if j < n and j - i > 1:
            j -= 1  # leave the last space to the word that follows
        out.append(text[i:j])
        i = j
    return out


def split_digits(text: str) -> list[str]:
    """Isolates every numeric character (``\\p{N}``): the first step of "smollm"."""
    out, cur = [], []
    for c in text:
        if unicodedata.category(c)[0] == "N":
            if cur:
                out.append("".join(cur))
                cur = []
            out.append(c)
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return out


class Tokenizer:
    """Byte-level BPE with special tokens.

    Args:
      tokens: the vocabulary; token ``i`` is ``tokens[i]`` in byte-to-unicode form.
      merges: "left right" pairs, highest priority first.
      special: strings of special tokens (``encode(..., special=True)`` matches them whole).
      bos_id, eos_id: ids of the begin/end-of-sequence tokens.
      add_bos: whether :meth:`encode` prepends ``bos_id`` by default.
      pre: the pre-tokenizer name (``tokenizer.ggml.pre``).
      chat_template: the template text, kept for reference; :meth:`chat` writes ChatML.

    Raises:
      ValueError: a pre-tokenizer this class does not implement.
    """

    def __init__(self, tokens: Sequence[str], merges: Iterable[str], *,
                 special: Iterable[str] = (), bos_id: int | None = None,
                 eos_id: int | None = None, add_bos: bool = False, pre: str = "gpt2",
                 chat_template: str | None = None):
        if pre not in _DIGIT_SPLIT | _GPT2:
            raise ValueError(f"Tokenizer: pre-tokenizer {pre!r} is not implemented; known: "
                             f"{sorted(_DIGIT_SPLIT | _GPT2)}")
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.special = {s: self.ids[s] for s in special}
        self.special_ids = set(self.special.values())
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.pre = pre
        self.chat_template = chat_template
        self._b2u = bytes_to_unicode()
        self._u2b = {c: b for b, c in self._b2u.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """From a GGUF path, a ``gguf.GGUFFile`` or its metadata dict.

        Raises:
          ValueError: not a GPT-2-style ("gpt2") BPE vocabulary.
        """
        if isinstance(source, (str, os.PathLike)):
            from lora_jax.models import gguf

            source = gguf.read(source)
        meta: Mapping[str, Any] = getattr(source, "metadata", source)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"Tokenizer.from_gguf: tokenizer.ggml.model={model!r}, only 'gpt2' "
                             "(byte-level BPE) is implemented")
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        special = [t for t, k in zip(tokens, types, strict=True) if k in (CONTROL, USER_DEFINED)]
        return cls(tokens, meta["tokenizer.ggml.merges"], special=special,
                   bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   pre=meta.get("tokenizer.ggml.pre", "gpt2"),
                   chat_template=meta.get("tokenizer.chat_template"))

    def __len__(self) -> int:
        return len(self.tokens)

    def pretokenize(self, text: str) -> list[str]:
        """The words BPE runs on, in order (they concatenate back to ``text``)."""
        pieces = split_digits(text) if self.pre in _DIGIT_SPLIT else [text]
        return [w for p in pieces for w in split_gpt2(p)]

    def _bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        # no whole-word vocabulary shortcut: GPT-2 BPE (HF ignore_merges=False) only merges
        parts = [self._b2u[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(self.ranks[p], i) for i, p in enumerate(zip(parts, parts[1:], strict=False))
                      if p in self.ranks]
            if not ranked:
                break
            _, best = min(ranked)
            pair = (parts[best], parts[best + 1])
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = []
        for p in parts:
            if p not in self.ids:
                raise ValueError(f"Tokenizer: BPE piece {p!r} of {word!r} is not in the "
                                 "vocabulary")
            ids.append(self.ids[p])
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str, *, special: bool = False, add_bos: bool | None = None
               ) -> list[int]:
        """Token ids of ``text``.

        Args:
          text: the text.
          special: match special-token strings (``<|im_start|>``) as single tokens; otherwise
            they are encoded as plain text.
          add_bos: prepend ``bos_id`` (default: the file's ``add_bos_token``).

        Raises:
          ValueError: ``add_bos`` for a tokenizer without ``bos_id``.
        """
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("encode: add_bos, but the tokenizer has no bos_id")
            ids.append(self.bos_id)
        for chunk, is_special in self._split_special(text) if special else [(text, False)]:
            if is_special:
                ids.append(self.special[chunk])
            else:
                for w in self.pretokenize(chunk):
                    ids.extend(self._bpe(w))
        return ids

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        out, i, start = [], 0, 0
        by_first: dict[str, list[str]] = {}
        for s in sorted(self.special, key=len, reverse=True):
            by_first.setdefault(s[0], []).append(s)
        while i < len(text):
            hit = next((s for s in by_first.get(text[i], ()) if text.startswith(s, i)), None)
            if hit:
                if start < i:
                    out.append((text[start:i], False))
                out.append((hit, True))
                i = start = i + len(hit)
            else:
                i += 1
        if start < len(text):
            out.append((text[start:], False))
        return out

    def decode(self, ids: Iterable[SupportsInt], *, skip_special: bool = False) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i in self.special_ids:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                if not skip_special:
                    out.append(self.tokens[i])
            else:
                buf.extend(self._u2b[c] for c in self.tokens[i])
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
             default_system: str | None = None) -> str:
        """ChatML text of ``messages`` (SmolLM2's template); encode it with ``special=True``.

        Args:
          messages: ``{"role": ..., "content": ...}`` dicts.
          add_generation_prompt: end with the opening of an assistant turn.
          default_system: a system message put first when the first message is not one
            (SmolLM2's template adds "You are a helpful AI assistant named SmolLM, trained by
            Hugging Face").

        >>> Tokenizer(["a"], [], pre="gpt2").chat([{"role": "user", "content": "Hi"}])
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        msgs = list(messages)
        if default_system and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": default_system})
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
