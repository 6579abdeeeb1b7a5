"""Hugging Face ``tokenizer.json`` tokenizers, read and run with the standard library (and ``regex``).

Three model types are covered: BPE -- byte-level (GPT-2, LLaMA-3, Qwen2) and SentencePiece-style
with byte fallback (LLaMA-1/2, Mistral) -- (``_tokenizer_bpe``), WordPiece (BERT;
``_tokenizer_wordpiece``) and Unigram (SentencePiece's ALBERT, T5, DeBERTa-v2, XLNet;
``_tokenizer_unigram``). Encoding a text runs the stages the file describes, in this order:

1. added tokens: the text is cut at every added token (``<|endoftext|>``, ``<s>``, ``[CLS]``,
   ``<|im_start|>`` ...), longest match first, so these are never split; tokens marked
   ``normalized: false`` are found in the raw text, the others (written the way the
   normalizer writes them) in each normalized piece. ``lstrip``/``rstrip`` take the
   whitespace beside a token into it, ``single_word`` ignores a match inside a word;
2. normalizer: Unicode forms NFC/NFD/NFKC/NFKD, Prepend, Replace, BertNormalizer, Lowercase,
   Strip, StripAccents, Nmt, Precompiled (SentencePiece's character map), Sequence -- applied
   to each piece between added tokens;
3. pre-tokenizer: ByteLevel, Split, Metaspace, Digits, BertPreTokenizer, Whitespace,
   WhitespaceSplit, Punctuation, Sequence -- cuts a piece into words;
4. model: BPE, WordPiece or Unigram over each word;
5. post-processor: TemplateProcessing ("<s> $A", "[CLS] $A [SEP] $B:1 [SEP]:1"), BertProcessing,
   RobertaProcessing, ByteLevel, Sequence. With ``add_special_tokens`` it adds the special
   tokens and sets the token type ids; without, a pair is the two sequences one after the
   other, type ids 0 then 1 (RoBERTa's: all 0).

``encode(text, pair=None)`` returns the ids; ``encode_pair(text, pair)`` and
``encode_with_types(text)`` return ``(ids, token_type_ids)``.

Decoding maps ids to tokens (an id with no token is skipped), optionally drops special
added tokens, then runs the decoder chain (ByteLevel, Metaspace, Replace, ByteFallback,
Fuse, Strip, WordPiece, Sequence) and joins what it returns.

Unicode versions. Patterns (``\\p{L}``, ``\\s`` ...) run on the ``regex`` module, whose Unicode
tables may be newer than those of the reference implementation: a character assigned only in
the newest Unicode versions can then be a letter here and not there, and split differently.
The character classes of the BERT components (punctuation, combining marks, control characters,
``\\w`` of the Whitespace pre-tokenizer) are the reference's own, older ones (see
``_tokenizer_parts``); lower-casing, NFKC and the like use this Python's ``unicodedata``, so
characters assigned after its Unicode version may be lower-cased or normalized differently.

Metaspace's ``prepend_scheme: "first"`` prepends only to the piece whose first character comes
from the text's first character, which a normalizer can change (``_tokenizer_parts.Normalizer``).

Any other component type, a malformed file or a merge naming an unknown token raises
``ValueError`` naming the file and the component. The ``truncation`` and ``padding``
settings of a file are not applied: ``encode`` returns the whole sequence.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ._tokenizer_bpe import BPEModel
from ._tokenizer_parts import (WHITE_SPACE, Reader, build_decoder, build_normalizer, build_post_processor,
                               build_pre_tokenizer)
from ._tokenizer_unigram import UnigramModel
from ._tokenizer_wordpiece import WordPieceModel

__all__ = ["HFTokenizer", "AddedToken", "load_tokenizer"]


def _is_word_char(c: str) -> bool:
    return c == "_" or c.isalnum()


class AddedToken(NamedTuple):
    """One entry of ``added_tokens``: matched in the text before anything else runs."""

    id: int
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = True


class _Matcher:
    """Finds added tokens in a text: leftmost match, the longest one there."""

    def __init__(self, tokens: Dict[str, AddedToken]):
        self.tokens = tokens  # the text a token is matched as -> the token
        patterns = sorted(tokens, key=len, reverse=True)
        self.compiled = re.compile("|".join(map(re.escape, patterns))) if patterns else None

    def split(self, text: str) -> List[Tuple[int, int, Optional[AddedToken]]]:
        """``text`` as (start, end, token or None) spans; the None spans are ordinary text."""
        if self.compiled is None:
            return [(0, len(text), None)]
        out: List[Tuple[int, int, Optional[AddedToken]]] = []
        done = 0  # text before this offset is already in ``out``
        for m in self.compiled.finditer(text):
            start, stop = m.span()
            token = self.tokens[m.group(0)]
            if token.single_word:
                before_ok = start == 0 or not _is_word_char(text[start - 1])
                after_ok = stop == len(text) or not _is_word_char(text[stop])
                if not (before_ok and after_ok):
                    continue
            if token.lstrip:
                new_start = start
                while new_start > done and text[new_start - 1] in WHITE_SPACE:
                    new_start -= 1
                start = new_start
            if token.rstrip:
                while stop < len(text) and text[stop] in WHITE_SPACE:
                    stop += 1
            if done < start:
                out.append((done, start, None))
            out.append((start, stop, token))
            done = stop
        if done != len(text):
            out.append((done, len(text), None))
        return out


def _open_json(path: Path, who: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{who}: file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path}: malformed JSON: nested too deeply") from None


class HFTokenizer:
    """A tokenizer described by a ``tokenizer.json`` (see the module docstring for the stages).

    ``spec`` is the parsed JSON; ``source`` names it in error messages. ``bos_token``,
    ``eos_token`` and ``pad_token`` (token strings, usually from ``tokenizer_config.json``)
    give the ``*_token_id`` properties. ``add_bos_token`` (None: leave it to the
    post-processor) makes ``encode(..., add_special_tokens=True)`` start with the BOS token
    (True) or drops a BOS the post-processor put first (False). ``chat_template`` is kept as
    data, unused here.
    """

    def __init__(
        self,
        spec: Dict[str, Any],
        *,
        source: str = "tokenizer.json",
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        add_bos_token: Optional[bool] = None,
        chat_template: Any = None,
    ):
        self.source = str(source)
        reader = Reader(self.source)
        try:
            self._parse(reader, spec)
        except ValueError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:  # a shape no check foresaw
            raise ValueError(f"{self.source}: malformed tokenizer description ({type(exc).__name__}: {exc})") from None
        self._spec = spec  # kept for to_dict: a checkpoint stores the tokenizer it was trained with
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and (not isinstance(token, str) or self.token_to_id(token) is None):
                raise ValueError(f"HFTokenizer: argument '{name}' {token!r} is not a token of {self.source}")
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            kind = type(add_bos_token).__name__
            raise TypeError(f"HFTokenizer: argument 'add_bos_token' expected bool or None, got {kind}")
        if add_bos_token and bos_token is None:
            raise ValueError("HFTokenizer: argument 'add_bos_token' is True but no 'bos_token' is given")

    def _parse(self, reader: Reader, spec: Any) -> None:
        spec = reader.obj(spec, "top level")
        self.added_tokens: List[AddedToken] = []
        for i, entry in enumerate(reader.get(spec, "added_tokens", list, "top level", [])):
            where = f"added_tokens[{i}]"
            entry = reader.obj(entry, where)
            token_id = reader.get(entry, "id", int, where)
            if token_id < 0:
                raise reader.fail(f"{where}.id", f"expected a non-negative id, got {token_id}")
            defaults = {"special": False, "lstrip": False, "rstrip": False, "single_word": False, "normalized": True}
            flags = {k: reader.get(entry, k, bool, where, d) for k, d in defaults.items()}
            self.added_tokens.append(AddedToken(token_id, reader.get(entry, "content", str, where), **flags))
        self._normalizer = build_normalizer(reader, spec.get("normalizer"))
        self._pre_tokenizer = build_pre_tokenizer(reader, spec.get("pre_tokenizer"))
        self._model = _build_model(reader, reader.get(spec, "model", dict, "top level"))
        self._post_processor = build_post_processor(reader, spec.get("post_processor"))
        self._decoder = build_decoder(reader, spec.get("decoder"))

        # A token marked ``normalized`` is matched, and read back by id, in the form the normalizer gives
        # it ("Ab" under Prepend("▁") is "▁Ab"); ``token_to_id`` takes the form the file writes.
        written = {
            t.id: self._normalizer(t.content) if t.normalized and self._normalizer and t.content else t.content
            for t in self.added_tokens
        }
        self._added_by_id: Dict[int, str] = written
        self._added_by_content: Dict[str, int] = {t.content: t.id for t in self.added_tokens}
        # Decoding skips a token whose text is a special token's own content.
        self._special = frozenset(t.content for t in self.added_tokens if t.special)
        raw = {t.content: t for t in self.added_tokens if not t.normalized and t.content}
        normalized = {written[t.id]: t for t in self.added_tokens if t.normalized and t.content}
        self._raw_matcher = _Matcher(raw)
        self._normalized_matcher = _Matcher({k: v for k, v in normalized.items() if k})
        vocab = dict(self._model.vocab)
        vocab.update(self._added_by_content)
        self._vocab_size = len(vocab)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], **kwargs) -> "HFTokenizer":
        """Read a ``tokenizer.json``; keyword arguments as for the constructor."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"HFTokenizer.from_file: argument 'path' expected a path, got {type(path).__name__}")
        path = Path(path)
        return cls(_open_json(path, "HFTokenizer.from_file"), source=str(path), **kwargs)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Distinct tokens: the model's vocabulary and the added tokens together."""
        return self._vocab_size

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token`` (an added token first, then the model's vocabulary), None if absent."""
        if not isinstance(token, str):
            raise TypeError(f"HFTokenizer.token_to_id: argument 'token' expected str, got {type(token).__name__}")
        i = self._added_by_content.get(token)
        return i if i is not None else self._model.vocab.get(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The token of ``token_id``, None if no token has it."""
        if not isinstance(token_id, (int, np.integer)) or isinstance(token_id, (bool, np.bool_)):
            raise TypeError(f"HFTokenizer.id_to_token: argument 'token_id' expected int, got {type(token_id).__name__}")
        token_id = int(token_id)
        t = self._added_by_id.get(token_id)
        return t if t is not None else self._model.id_to_token.get(token_id)

    @property
    def bos_token_id(self) -> Optional[int]:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    # ------------------------------------------------------------------ encoding

    def _pieces(self, text: str) -> List[Tuple[str, Optional[int], bool]]:
        """(text, added token id or None, starts the text) for each piece between added tokens, normalized."""
        out: List[Tuple[str, Optional[int], bool]] = []
        for start, stop, token in self._raw_matcher.split(text):
            if token is not None:
                out.append((text[start:stop], token.id, start == 0))
                continue
            piece = text[start:stop]
            if not piece:
                continue
            first = start == 0  # the piece's first character comes from offset 0 of the text
            if self._normalizer is not None:
                piece, kept = self._normalizer.track(piece)
                first = first and kept
            for s, e, inner in self._normalized_matcher.split(piece):
                if inner is not None or e > s:
                    out.append((piece[s:e], None if inner is None else inner.id, first and s == 0))
        return out

    def _tokenize(self, text: str) -> List[int]:
        """The ids of one sequence, before post-processing."""
        ids: List[int] = []
        for piece, token_id, at_origin in self._pieces(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            words = [(piece, at_origin)]
            if self._pre_tokenizer is not None:
                words = self._pre_tokenizer(words)
            for word, _ in words:
                ids.extend(self._model.tokenize(word))
        return ids

    def _check_text(self, op: str, name: str, text: Any) -> None:
        if not isinstance(text, str):
            raise TypeError(f"{op}: argument '{name}' expected str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{op}: argument '{name}' holds a lone surrogate at index {exc.start} (no UTF-8 form)"
            ) from None

    def _encode(self, op: str, text: str, pair: Optional[str], add_special_tokens: bool) -> Tuple[List[int], List[int]]:
        self._check_text(op, "text", text)
        if pair is not None:
            self._check_text(op, "pair", pair)
        if not isinstance(add_special_tokens, (bool, np.bool_)):
            kind = type(add_special_tokens).__name__
            raise TypeError(f"{op}: argument 'add_special_tokens' expected bool, got {kind}")
        # Each sequence starts with its own type id (0, and 1 for the pair); a post-processor may rewrite them.
        encodings = [(self._tokenize(text), [], 0)]
        if pair is not None:
            encodings.append((self._tokenize(pair), [], 1))
        encodings = [(ids, [False] * len(ids), [type_id] * len(ids)) for ids, _, type_id in encodings]
        if self._post_processor is not None:
            encodings = self._post_processor(encodings, bool(add_special_tokens))
        ids: List[int] = []
        added: List[bool] = []
        types: List[int] = []
        for part_ids, part_added, part_types in encodings:
            ids, added, types = ids + part_ids, added + part_added, types + part_types
        if not add_special_tokens:
            return ids, types
        bos = self.bos_token_id
        if self.add_bos_token is True and not (ids and added[0] and ids[0] == bos):
            ids, added, types = [bos] + ids, [True] + added, types[:1] + types
        elif self.add_bos_token is False and ids and added[0] and ids[0] == bos:
            ids, added, types = ids[1:], added[1:], types[1:]
        return ids, types

    def encode(self, text: str, pair: Optional[str] = None, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text`` (and of ``pair``, for a sequence pair); with ``add_special_tokens`` the
        post-processor's tokens ([CLS] ... [SEP], BOS ...) too."""
        return self._encode("HFTokenizer.encode", text, pair, add_special_tokens)[0]

    def encode_pair(self, text: str, pair: str, add_special_tokens: bool = True) -> Tuple[List[int], List[int]]:
        """``(ids, token_type_ids)`` of the pair (``text``, ``pair``): the type ids are the post-processor's
        (BERT: 0 up to the first [SEP], then 1), or 0 for ``text`` and 1 for ``pair`` without special tokens."""
        if pair is None:
            raise TypeError("HFTokenizer.encode_pair: argument 'pair' expected str, got NoneType")
        return self._encode("HFTokenizer.encode_pair", text, pair, add_special_tokens)

    def encode_with_types(self, text: str, add_special_tokens: bool = True) -> Tuple[List[int], List[int]]:
        """``(ids, token_type_ids)`` of one sequence."""
        return self._encode("HFTokenizer.encode_with_types", text, None, add_special_tokens)

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; an id with no token is skipped, special added tokens too if asked."""
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise TypeError(
                    f"HFTokenizer.decode: argument 'ids' expected a 1-D integer array, got {ids.ndim}-D {ids.dtype}"
                )
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            raise TypeError(f"HFTokenizer.decode: argument 'ids' expected a list of ints, got {type(ids).__name__}")
        if not isinstance(skip_special_tokens, (bool, np.bool_)):
            kind = type(skip_special_tokens).__name__
            raise TypeError(f"HFTokenizer.decode: argument 'skip_special_tokens' expected bool, got {kind}")
        tokens: List[str] = []
        for k, i in enumerate(ids):
            if not isinstance(i, (int, np.integer)) or isinstance(i, (bool, np.bool_)):
                kind = type(i).__name__
                raise TypeError(f"HFTokenizer.decode: argument 'ids' expected ints, got {kind} at index {k}")
            if i < 0:
                raise ValueError(f"HFTokenizer.decode: argument 'ids' expected non-negative ids, got {i} at index {k}")
            token = self.id_to_token(int(i))
            if token is None or (skip_special_tokens and token in self._special):
                continue
            tokens.append(token)
        if self._decoder is None:
            return " ".join(tokens)
        return "".join(self._decoder(tokens))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ as a training tokenizer

    def word_starts(self, ids: Sequence[int]) -> np.ndarray:
        """(N,) bool: True where token t of ``ids`` begins a word (whole-word masking's unit).

        WordPiece: a piece without the continuation prefix ("##") begins a word. SentencePiece
        pieces: one carrying "▁" begins a word. Others (byte-level BPE): a piece whose decoded text
        starts with whitespace, or follows one ending with whitespace. An added (special) token, the
        token after one, and the first token always begin a word.
        """
        ids = [int(i) for i in ids]
        pieces = [self.id_to_token(i) or "" for i in ids]
        added = [i in self._added_by_id for i in ids]
        after_added = [False] + added[:-1]
        if isinstance(self._model, WordPieceModel):
            prefix = self._model.prefix
            starts = [a or not p.startswith(prefix) for p, a in zip(pieces, added)]
        elif any(p.startswith("\u2581") for p in pieces):  # SentencePiece: "▁" opens a word (a lone "▁" too)
            starts = [a or b or p.startswith("\u2581") for p, a, b in zip(pieces, added, after_added)]
        else:  # byte-level BPE and the like: the decoded text's spaces
            texts = [self.decode([i]) for i in ids]
            starts = [a or b or t[:1].isspace() for t, a, b in zip(texts, added, after_added)]
            for t in range(1, len(ids)):
                starts[t] = starts[t] or texts[t - 1][-1:].isspace()
        if ids:
            starts[0] = True
        return np.array(starts, dtype=bool)

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of a training text as int64 (T,), without the template's special tokens: the text
        continues, it does not start a sequence."""
        return np.asarray(self.encode(text, add_special_tokens=False), dtype=np.int64)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able state (stored in checkpoints): ``{"kind": "hf", "tokenizer": <tokenizer.json text>, ...}``."""
        return {"kind": "hf", "tokenizer": json.dumps(self._spec, ensure_ascii=False, sort_keys=True),
                "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "add_bos_token": self.add_bos_token, "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "HFTokenizer":
        """The tokenizer ``to_dict`` describes; ``ValueError`` naming what does not fit."""
        op = "HFTokenizer.from_dict"
        if not isinstance(d, dict) or d.get("kind") != "hf" or not isinstance(d.get("tokenizer"), str):
            raise ValueError(f"{op}: argument 'd' expected {{'kind': 'hf', 'tokenizer': <JSON text>, ...}}, "
                             f"got {d!r:.80}")
        try:
            spec = json.loads(d["tokenizer"])
        except json.JSONDecodeError as e:
            raise ValueError(f"{op}: argument 'd' holds a 'tokenizer' that is not JSON: {e}") from None
        unknown = set(d) - {"kind", "tokenizer", "bos_token", "eos_token", "pad_token", "add_bos_token", "chat_template"}
        if unknown:
            raise ValueError(f"{op}: argument 'd' holds unknown entries {sorted(unknown)}")
        options = {k: d.get(k) for k in ("bos_token", "eos_token", "pad_token", "add_bos_token", "chat_template")}
        return cls(spec, source="a checkpoint's tokenizer", **options)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable state, compared by value


MODELS = ("BPE", "WordPiece", "Unigram")


def _build_model(reader: Reader, spec: Dict[str, Any], where: str = "model"):
    """The model the file names: BPE, WordPiece or Unigram (a file without a type is BPE if it has merges)."""
    kind = reader.get(spec, "type", (str, None), where, None)
    if kind is None:
        kind = "BPE" if "merges" in spec else "WordPiece" if "continuing_subword_prefix" in spec else None
    if kind == "WordPiece":
        return WordPieceModel(reader, spec, where)
    if kind == "Unigram":
        return UnigramModel(reader, spec, where)
    if kind != "BPE":
        raise reader.fail(where, f"component type '{kind}' is not supported (supported: {', '.join(MODELS)})")
    return BPEModel(reader, spec, where)


def _config_token(value: Any, key: str, path: Path) -> Optional[str]:
    """A token in ``tokenizer_config.json``: a string, ``{"content": ...}``, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key}: expected a string, {{'content': ...}} or null, got {value!r:.60}")


def load_tokenizer(folder: Union[str, os.PathLike]) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder.

    Reads ``tokenizer.json`` and, when present, ``tokenizer_config.json`` (``bos_token``,
    ``eos_token``, ``pad_token``, ``add_bos_token``, ``chat_template``) and
    ``chat_template.jinja`` (a chat template kept as a string).
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer: argument 'folder' expected a path, got {type(folder).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"load_tokenizer: argument 'folder' is not a folder: {folder}")
    spec = _open_json(folder / "tokenizer.json", "load_tokenizer")
    kwargs: Dict[str, Any] = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.exists():
        config = _open_json(config_path, "load_tokenizer")
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
        for key in ("bos_token", "eos_token", "pad_token"):
            kwargs[key] = _config_token(config.get(key), key, config_path)
        add_bos = config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise ValueError(f"{config_path}: add_bos_token: expected true, false or null, got {add_bos!r:.60}")
        kwargs["add_bos_token"] = add_bos
        template = config.get("chat_template")
        if template is not None and not isinstance(template, (str, list)):
            kind = type(template).__name__
            raise ValueError(f"{config_path}: chat_template: expected a string or a list, got {kind}")
        kwargs["chat_template"] = template
    jinja = folder / "chat_template.jinja"
    if kwargs.get("chat_template") is None and jinja.is_file():
        kwargs["chat_template"] = jinja.read_text(encoding="utf-8")
    try:
        return HFTokenizer(spec, source=str(folder / "tokenizer.json"), **kwargs)
    except ValueError as exc:
        if "HFTokenizer: argument" in str(exc):
            raise ValueError(f"{config_path}: {exc}") from None
        raise
