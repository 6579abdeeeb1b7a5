"""The parts of a ``tokenizer.json`` pipeline: normalizers, pre-tokenizers, post-processors, decoders.

Each part is built from its JSON object by ``build_normalizer``, ``build_pre_tokenizer``,
``build_post_processor`` or ``build_decoder``, which check every field they read and raise
``ValueError`` naming the file, the component and the field. The built part is a plain
function:

- normalizer:     ``str -> str``
- pre-tokenizer:  ``list[Piece] -> list[Piece]``, a piece being ``(text, at_origin)`` where
                  ``at_origin`` says the piece starts at offset 0 of the original text
                  (Metaspace's ``prepend_scheme="first"`` prepends only there);
- post-processor: ``list[int] -> (list[int], list[bool])``, the flags marking the ids it added;
- decoder:        ``list[str] -> list[str]`` (a chain; the caller joins the result).

Splitting follows one rule everywhere (a Split pre-tokenizer, Metaspace's split on the
replacement character, Digits, a Replace pattern): the text is cut into alternating
non-matches and matches that cover it, and a *behavior* says what to do with the matches
(keep them alone, drop them, glue them to a neighbour).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable, Dict, List, Optional, Tuple

Piece = Tuple[str, bool]
Span = Tuple[int, int, bool]  # (start, end, is_match), character offsets

_MISSING = object()


def regex_module():
    """The third-party ``regex`` module (``\\p{L}``, ``\\p{N}``), imported when first needed."""
    try:
        import regex
    except ImportError as exc:  # pragma: no cover - the [hf] extra installs it
        raise ImportError("npformer.hf.tokenizer needs the 'regex' module (pip install npformer[hf])") from exc
    return regex


class Reader:
    """Typed access to the fields of one JSON object, with errors that name the file and the path."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, where: str, message: str) -> ValueError:
        return ValueError(f"{self.file}: {where}: {message}")

    def obj(self, value: Any, where: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a JSON object, got {type(value).__name__}")
        return value

    def get(self, obj: Dict[str, Any], key: str, types, where: str, default: Any = _MISSING) -> Any:
        """``obj[key]`` checked against ``types`` (``None`` in the tuple allows JSON null)."""
        if key not in obj:
            if default is _MISSING:
                raise self.fail(where, f"missing field '{key}'")
            return default
        value = obj[key]
        types = types if isinstance(types, tuple) else (types,)
        allowed = tuple(t for t in types if t is not None)
        ok = (value is None and None in types) or (
            isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        )
        if not ok:
            names = " or ".join("null" if t is None else t.__name__ for t in types)
            raise self.fail(f"{where}.{key}", f"expected {names}, got {type(value).__name__} {value!r:.60}")
        return value

    def type_of(self, obj: Any, where: str, supported) -> str:
        obj = self.obj(obj, where)
        kind = self.get(obj, "type", str, where)
        if kind not in supported:
            names = ", ".join(sorted(supported))
            raise self.fail(where, f"component type '{kind}' is not supported (supported: {names})")
        return kind

    def char(self, obj: Dict[str, Any], key: str, where: str) -> str:
        value = self.get(obj, key, str, where)
        if len(value) != 1:
            raise self.fail(f"{where}.{key}", f"expected one character, got {value!r}")
        return value

    def pattern(self, obj: Dict[str, Any], key: str, where: str):
        """A ``{"String": s}`` or ``{"Regex": r}`` pattern, compiled with ``regex``."""
        spec = self.obj(self.get(obj, key, dict, where), f"{where}.{key}")
        if len(spec) != 1 or next(iter(spec)) not in ("String", "Regex"):
            raise self.fail(f"{where}.{key}", f"expected {{'String': ...}} or {{'Regex': ...}}, got {spec!r:.80}")
        (kind, text), = spec.items()
        if not isinstance(text, str):
            raise self.fail(f"{where}.{key}.{kind}", f"expected str, got {type(text).__name__}")
        regex = regex_module()
        source = regex.escape(text) if kind == "String" else text
        try:
            compiled = regex.compile(source, flags=regex.V0)
        except regex.error as exc:
            raise self.fail(f"{where}.{key}.{kind}", f"invalid pattern {text!r}: {exc}") from None
        return _Literal(compiled, text) if kind == "String" else compiled


# ----------------------------------------------------------------------------- splitting


def find_spans(compiled, text: str) -> List[Span]:
    """Cut ``text`` into alternating non-matches and matches of ``compiled`` that cover it.

    An empty match right where the previous match ended is skipped (so ``x*`` on "xa" gives one
    match, not two), and an empty text is one empty non-match.
    """
    if not text:
        return [(0, 0, False)]
    spans: List[Span] = []
    prev = 0
    last_end: Optional[int] = None
    for m in compiled.finditer(text):
        start, end = m.span()
        if start == end and last_end == end:
            continue
        if prev != start:
            spans.append((prev, start, False))
        spans.append((start, end, True))
        prev = last_end = end
    if prev != len(text):
        spans.append((prev, len(text), False))
    return spans


def char_spans(text: str, predicate: Callable[[str], bool]) -> List[Span]:
    """Each character for which ``predicate`` holds is a match of its own."""
    if not text:
        return [(0, 0, False)]
    spans: List[Span] = []
    prev = 0
    for i, c in enumerate(text):
        if predicate(c):
            if prev != i:
                spans.append((prev, i, False))
            spans.append((i, i + 1, True))
            prev = i + 1
    if prev != len(text):
        spans.append((prev, len(text), False))
    return spans


BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def apply_behavior(spans: List[Span], behavior: str) -> List[Tuple[int, int]]:
    """The pieces ``behavior`` makes of the spans (empty pieces dropped)."""
    if behavior == "Isolated":
        out = [(s, e) for s, e, _ in spans]
    elif behavior == "Removed":
        out = [(s, e) for s, e, is_match in spans if not is_match]
    elif behavior == "MergedWithPrevious":  # a match ends the piece before it
        out = []
        previous_match = False
        for s, e, is_match in spans:
            if is_match and not previous_match and out:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
            previous_match = is_match
    elif behavior == "MergedWithNext":  # a match starts the piece after it
        out = []
        previous_match = False
        for s, e, is_match in reversed(spans):
            if is_match and not previous_match and out:
                out[-1] = (s, out[-1][1])
            else:
                out.append((s, e))
            previous_match = is_match
        out.reverse()
    else:  # Contiguous: runs of matches, and runs of non-matches, become one piece each
        out = []
        previous_match = False
        for s, e, is_match in spans:
            if is_match == previous_match and out:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
            previous_match = is_match
    return [(s, e) for s, e in out if e > s]


def split_pieces(pieces: List[Piece], spans_of: Callable[[str], List[Span]], behavior: str, invert: bool = False):
    out: List[Piece] = []
    for text, at_origin in pieces:
        spans = spans_of(text)
        if invert:
            spans = [(s, e, not m) for s, e, m in spans]
        out.extend((text[s:e], at_origin and s == 0) for s, e in apply_behavior(spans, behavior))
    return out


def replace_all(compiled, text: str, content: str) -> str:
    """Every match of ``compiled`` in ``text`` replaced by ``content`` (a literal goes the quick way)."""
    literal = getattr(compiled, "literal", None)
    if literal:
        return text.replace(literal, content)
    return "".join(content if m else text[s:e] for s, e, m in find_spans(compiled, text))


class _Literal:
    """A ``{"String": s}`` pattern: the escaped regex, and ``s`` itself for plain ``str.replace``."""

    def __init__(self, compiled, literal: str):
        self.compiled, self.literal = compiled, literal

    def finditer(self, text: str):
        return self.compiled.finditer(text)


# ----------------------------------------------------------------------------- byte level

# GPT-2's pre-tokenizer pattern (contractions, letters, digits, other symbols, whitespace).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> Dict[int, str]:
    """Byte b -> a printable character: printable Latin-1 bytes stand for themselves, the rest for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# str.translate table taking a Latin-1 view of UTF-8 bytes to the byte-level alphabet.
_LATIN1_TO_BYTE_CHARS = {b: c for b, c in BYTE_TO_CHAR.items()}


def to_byte_level(text: str) -> str:
    """Each UTF-8 byte of ``text`` as its byte-level character."""
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHARS)


# ----------------------------------------------------------------------------- normalizers

NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD", "Prepend", "Replace", "Sequence")


def build_normalizer(reader: Reader, spec: Any, where: str = "normalizer") -> Optional[Callable[[str], str]]:
    if spec is None:
        return None
    kind = reader.type_of(spec, where, NORMALIZERS)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s, form=kind: unicodedata.normalize(form, s)
    if kind == "Prepend":
        prefix = reader.get(spec, "prepend", str, where)
        return lambda s: prefix + s if s else s
    if kind == "Replace":
        compiled = reader.pattern(spec, "pattern", where)
        content = reader.get(spec, "content", str, where)
        return lambda s: replace_all(compiled, s, content)
    return _chain(reader, spec, where, "normalizers", build_normalizer)


def _chain(reader: Reader, spec: dict, where: str, key: str, build: Callable) -> Callable:
    """A ``Sequence`` component: the stages listed under ``key``, each applied to the previous one's output."""
    parts = reader.get(spec, key, list, where)
    steps = [build(reader, p, f"{where}.{key}[{i}]") for i, p in enumerate(parts)]
    steps = [f for f in steps if f is not None]

    def sequence(value):
        for f in steps:
            value = f(value)
        return value

    return sequence


# ----------------------------------------------------------------------------- pre-tokenizers

PRE_TOKENIZERS = ("ByteLevel", "Split", "Metaspace", "Digits", "Sequence")
PREPEND_SCHEMES = ("always", "first", "never")


def metaspace_scheme(reader: Reader, spec: Dict[str, Any], where: str) -> str:
    """``prepend_scheme``, or the older ``add_prefix_space`` flag it replaced."""
    scheme = reader.get(spec, "prepend_scheme", (str, None), where, None)
    if scheme is None:
        return "always" if reader.get(spec, "add_prefix_space", bool, where, True) else "never"
    if scheme not in PREPEND_SCHEMES:
        raise reader.fail(f"{where}.prepend_scheme", f"expected one of {PREPEND_SCHEMES}, got {scheme!r}")
    return scheme


def build_pre_tokenizer(reader: Reader, spec: Any, where: str = "pre_tokenizer"):
    if spec is None:
        return None
    kind = reader.type_of(spec, where, PRE_TOKENIZERS)
    if kind == "ByteLevel":
        add_prefix_space = reader.get(spec, "add_prefix_space", bool, where, True)
        reader.get(spec, "trim_offsets", bool, where, True)
        use_regex = reader.get(spec, "use_regex", bool, where, True)
        compiled = regex_module().compile(GPT2_PATTERN) if use_regex else None

        def byte_level(pieces: List[Piece]) -> List[Piece]:
            if add_prefix_space:
                pieces = [(t if t.startswith(" ") else " " + t, o) for t, o in pieces]
            if compiled is not None:
                pieces = split_pieces(pieces, lambda t: find_spans(compiled, t), "Isolated")
            return [(to_byte_level(t), o) for t, o in pieces]

        return byte_level
    if kind == "Split":
        compiled = reader.pattern(spec, "pattern", where)
        behavior = reader.get(spec, "behavior", str, where)
        if behavior not in BEHAVIORS:
            raise reader.fail(f"{where}.behavior", f"expected one of {BEHAVIORS}, got {behavior!r}")
        invert = reader.get(spec, "invert", bool, where, False)
        return lambda pieces: split_pieces(pieces, lambda t: find_spans(compiled, t), behavior, invert)
    if kind == "Metaspace":
        replacement = reader.char(spec, "replacement", where)
        scheme = metaspace_scheme(reader, spec, where)
        split = reader.get(spec, "split", bool, where, True)

        def metaspace(pieces: List[Piece]) -> List[Piece]:
            out: List[Piece] = []
            for text, at_origin in pieces:
                text = text.replace(" ", replacement)
                if scheme == "always" or (scheme == "first" and at_origin):
                    if not text.startswith(replacement):
                        text = replacement + text
                out.append((text, at_origin))
            if split:
                out = split_pieces(out, lambda t: char_spans(t, lambda c: c == replacement), "MergedWithNext")
            return out

        return metaspace
    if kind == "Digits":
        individual = reader.get(spec, "individual_digits", bool, where, False)
        behavior = "Isolated" if individual else "Contiguous"

        def is_numeric(c: str) -> bool:
            return unicodedata.category(c) in ("Nd", "Nl", "No")

        return lambda pieces: split_pieces(pieces, lambda t: char_spans(t, is_numeric), behavior)
    return _chain(reader, spec, where, "pretokenizers", build_pre_tokenizer)


# ----------------------------------------------------------------------------- post-processors

POST_PROCESSORS = ("ByteLevel", "TemplateProcessing", "Sequence")
PostProcessor = Callable[[List[int]], Tuple[List[int], List[bool]]]


def build_post_processor(reader: Reader, spec: Any, where: str = "post_processor") -> Optional[PostProcessor]:
    if spec is None:
        return None
    kind = reader.type_of(spec, where, POST_PROCESSORS)
    if kind == "ByteLevel":  # changes offsets only, never ids
        return lambda ids: (list(ids), [False] * len(ids))
    if kind == "TemplateProcessing":
        specials = reader.get(spec, "special_tokens", dict, where, {})
        special_ids: Dict[str, List[int]] = {}
        for name, entry in specials.items():
            w = f"{where}.special_tokens[{name!r}]"
            entry = reader.obj(entry, w)
            ids = reader.get(entry, "ids", list, w)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise reader.fail(f"{w}.ids", f"expected a list of non-negative ints, got {ids!r:.80}")
            special_ids[name] = ids
        single = reader.get(spec, "single", list, where)
        template: List[Optional[List[int]]] = []  # None: the sequence itself
        for i, item in enumerate(single):
            w = f"{where}.single[{i}]"
            item = reader.obj(item, w)
            if len(item) != 1 or next(iter(item)) not in ("SpecialToken", "Sequence"):
                raise reader.fail(w, f"expected {{'SpecialToken': ...}} or {{'Sequence': ...}}, got {item!r:.80}")
            (part, body), = item.items()
            body = reader.obj(body, f"{w}.{part}")
            name = reader.get(body, "id", str, f"{w}.{part}")
            if part == "Sequence":
                template.append(None)
            elif name not in special_ids:
                raise reader.fail(f"{w}.{part}.id", f"special token {name!r} is not in {where}.special_tokens")
            else:
                template.append(special_ids[name])
        reader.get(spec, "pair", (list, None), where, None)

        def template_processing(ids: List[int]) -> Tuple[List[int], List[bool]]:
            out: List[int] = []
            added: List[bool] = []
            for part in template:
                chunk = ids if part is None else part
                out.extend(chunk)
                added.extend([part is not None] * len(chunk))
            return out, added

        return template_processing
    parts = reader.get(spec, "processors", list, where)
    steps = [build_post_processor(reader, p, f"{where}.processors[{i}]") for i, p in enumerate(parts)]
    steps = [f for f in steps if f is not None]

    def sequence(ids: List[int]) -> Tuple[List[int], List[bool]]:
        added = [False] * len(ids)
        for f in steps:
            kept = iter(added)
            ids, flags = f(ids)
            added = [True if flag else next(kept) for flag in flags]
        return ids, added

    return sequence


# ----------------------------------------------------------------------------- decoders

DECODERS = ("ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip", "Sequence")
_HEX_BYTE = re.compile(r"\+?[0-9a-fA-F]{1,2}")


def _byte_level_decode(tokens: List[str]) -> List[str]:
    """Byte-level characters back to bytes (a token with any other character keeps its own UTF-8)."""
    data = bytearray()
    for token in tokens:
        try:
            data.extend(CHAR_TO_BYTE[c] for c in token)
        except KeyError:
            data.extend(token.encode("utf-8"))
    return [data.decode("utf-8", errors="replace")]


def _byte_fallback_decode(tokens: List[str]) -> List[str]:
    """Runs of ``<0xXX>`` tokens become the text their bytes spell (one U+FFFD per byte if not UTF-8)."""
    out: List[str] = []
    pending = bytearray()

    def flush():
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" for _ in pending)
            pending.clear()

    for token in tokens:
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">") and _HEX_BYTE.fullmatch(token[3:5]):
            pending.append(int(token[3:5], 16))
        else:
            flush()
            out.append(token)
    flush()
    return out


def build_decoder(reader: Reader, spec: Any, where: str = "decoder") -> Optional[Callable[[List[str]], List[str]]]:
    if spec is None:
        return None
    kind = reader.type_of(spec, where, DECODERS)
    if kind == "ByteLevel":
        return _byte_level_decode
    if kind == "ByteFallback":
        return _byte_fallback_decode
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Metaspace":
        replacement = reader.char(spec, "replacement", where)
        scheme = metaspace_scheme(reader, spec, where)

        def metaspace(tokens: List[str]) -> List[str]:
            # The first token loses its replacement characters (the prepended space) unless nothing was prepended.
            return [
                t.replace(replacement, "" if i == 0 and scheme != "never" else " ") for i, t in enumerate(tokens)
            ]

        return metaspace
    if kind == "Replace":
        compiled = reader.pattern(spec, "pattern", where)
        content = reader.get(spec, "content", str, where)
        return lambda tokens: [replace_all(compiled, t, content) for t in tokens]
    if kind == "Strip":
        content = reader.char(spec, "content", where)
        start = reader.get(spec, "start", int, where)
        stop = reader.get(spec, "stop", int, where)
        if start < 0 or stop < 0:
            raise reader.fail(where, f"expected non-negative start and stop, got {start}, {stop}")

        def strip(tokens: List[str]) -> List[str]:
            out = []
            for t in tokens:
                head = 0
                while head < min(start, len(t)) and t[head] == content:
                    head += 1
                tail = 0
                while tail < min(stop, len(t)) and t[len(t) - 1 - tail] == content:
                    tail += 1
                out.append(t[head : len(t) - tail] if head + tail <= len(t) else "")
            return out

        return strip
    return _chain(reader, spec, where, "decoders", build_decoder)
