"""The parts of a ``tokenizer.json`` pipeline: normalizers, pre-tokenizers, post-processors, decoders.

Each part is built from its JSON object by ``build_normalizer``, ``build_pre_tokenizer``,
``build_post_processor`` or ``build_decoder``, which check every field they read and raise
``ValueError`` naming the file, the component and the field. The built part is a plain
function:

- normalizer:     ``str -> str``
- pre-tokenizer:  ``list[Piece] -> list[Piece]``, a piece being ``(text, at_origin)`` where
                  ``at_origin`` says the piece starts at offset 0 of the original text
                  (Metaspace's ``prepend_scheme="first"`` prepends only there);
- post-processor: ``(list[Encoding], add_special) -> list[Encoding]``, an encoding being
                  ``(ids, added, type_ids)`` (``added`` flags the ids a post-processor put in); it
                  gets one encoding, or two for a pair, and a template joins them into one;
- decoder:        ``list[str] -> list[str]`` (a chain; the caller joins the result).

Splitting follows one rule everywhere (a Split pre-tokenizer, Metaspace's split on the
replacement character, Digits, a Replace pattern): the text is cut into alternating
non-matches and matches that cover it, and a *behavior* says what to do with the matches
(keep them alone, drop them, glue them to a neighbour).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
import struct
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


# ----------------------------------------------------------------------------- character classes
#
# The reference implementation classifies characters with tables from an older Unicode version than
# the ``unicodedata`` (and ``regex``) tables here. Each class below is the current table less the
# characters the reference does not put in it (found by running it over every code point); the
# few characters it places in a class that Unicode has since moved are listed as additions.


def _ranges(*pairs: Tuple[int, int]) -> Tuple[List[int], List[int]]:
    return [a for a, _ in pairs], [b for _, b in pairs]


def _in(table: Tuple[List[int], List[int]], c: str) -> bool:
    starts, stops = table
    k = bisect.bisect_right(starts, ord(c)) - 1
    return k >= 0 and ord(c) <= stops[k]


_WORD_EXCLUDED = _ranges(
    (0x558, 0x558), (0x58B, 0x58C), (0x5C8, 0x5C9), (0x88F, 0x88F), (0xB53, 0xB54), (0xC5C, 0xC5C), (0xCDC, 0xCDC),
    (0x1ACF, 0x1AF0), (0x208F, 0x208F), (0x209D, 0x209F), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4),
    (0xA7DD, 0xA7DD), (0xA7E2, 0xA7E2), (0xA7F1, 0xA7F1), (0xAB6C, 0xAB6D), (0x107BB, 0x107BF), (0x10940, 0x10959),
    (0x10EC5, 0x10EC7), (0x10ECB, 0x10ECF), (0x10ED9, 0x10EEE), (0x10EF0, 0x10EFB), (0x11B0A, 0x11B0A),
    (0x11B60, 0x11B67), (0x11DB0, 0x11DDB), (0x11DE0, 0x11DE9), (0x11DF0, 0x11DF1), (0x1246F, 0x1246F),
    (0x12475, 0x1247F), (0x12550, 0x12686), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF6),
    (0x187F8, 0x187FF), (0x18CD6, 0x18CDA), (0x18D09, 0x18D20), (0x18D80, 0x18DF2), (0x18E00, 0x19191),
    (0x191A0, 0x191D2), (0x1B123, 0x1B128), (0x1B168, 0x1B168), (0x1D127, 0x1D128), (0x1D250, 0x1D252),
    (0x1D25B, 0x1D25C), (0x1D25F, 0x1D25F), (0x1D280, 0x1D281), (0x1D6A6, 0x1D6A6), (0x1DF1F, 0x1DF24),
    (0x1DF2B, 0x1DF81), (0x1DF90, 0x1DF96), (0x1DFCD, 0x1DFFF), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6F5),
    (0x1E6FE, 0x1E6FF), (0x2B73A, 0x2B73F), (0x2B81E, 0x2B81E), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479),
    (0x3D000, 0x3FC3F),
)
_PUNCTUATION_EXCLUDED = _ranges(
    (0x61D, 0x61D), (0x9FD, 0x9FD), (0xA76, 0xA76), (0xC77, 0xC77), (0xC84, 0xC84), (0x1B7D, 0x1B7E),
    (0x2E43, 0x2E4F), (0x2E52, 0x2E5D), (0x10EAD, 0x10EAD), (0x10F55, 0x10F59), (0x10F86, 0x10F89),
    (0x1144B, 0x1144F), (0x1145A, 0x1145B), (0x1145D, 0x1145D), (0x11660, 0x1166C), (0x116B9, 0x116B9),
    (0x1183B, 0x1183B), (0x11944, 0x11946), (0x119E2, 0x119E2), (0x11A3F, 0x11A46), (0x11A9A, 0x11A9C),
    (0x11A9E, 0x11AA2), (0x11C41, 0x11C45), (0x11C70, 0x11C71), (0x11EF7, 0x11EF8), (0x11FFF, 0x11FFF),
    (0x12FF1, 0x12FF2), (0x16E97, 0x16E9A), (0x16FE2, 0x16FE2), (0x1E95E, 0x1E95F),
)
_MARK_EXCLUDED = _ranges(
    (0x7FD, 0x7FD), (0x898, 0x89F), (0x8CA, 0x8D3), (0x9FE, 0x9FE), (0xAFA, 0xAFF), (0xB55, 0xB55), (0xC04, 0xC04),
    (0xC3C, 0xC3C), (0xD00, 0xD00), (0xD3B, 0xD3C), (0xD81, 0xD81), (0xEBA, 0xEBA), (0x1715, 0x1715),
    (0x180F, 0x180F), (0x1ABF, 0x1ACE), (0x1CF7, 0x1CF7), (0x1DF6, 0x1DFA), (0xA82C, 0xA82C), (0xA8FF, 0xA8FF),
    (0x10D24, 0x10D27), (0x10EAB, 0x10EAC), (0x10F46, 0x10F50), (0x10F82, 0x10F85), (0x11070, 0x11070),
    (0x11073, 0x11074), (0x110C2, 0x110C2), (0x11145, 0x11146), (0x111C9, 0x111C9), (0x111CE, 0x111CF),
    (0x1133B, 0x1133B), (0x1145E, 0x1145E), (0x1182C, 0x1183A), (0x11930, 0x11935), (0x11937, 0x11938),
    (0x1193B, 0x1193E), (0x11940, 0x11940), (0x11942, 0x11943), (0x119D1, 0x119D7), (0x119DA, 0x119E0),
    (0x119E4, 0x119E4), (0x11A01, 0x11A0A), (0x11A33, 0x11A39), (0x11A3B, 0x11A3E), (0x11A47, 0x11A47),
    (0x11A51, 0x11A5B), (0x11A8A, 0x11A99), (0x11D31, 0x11D36), (0x11D3A, 0x11D3A), (0x11D3C, 0x11D3D),
    (0x11D3F, 0x11D45), (0x11D47, 0x11D47), (0x11D8A, 0x11D8E), (0x11D90, 0x11D91), (0x11D93, 0x11D97),
    (0x11EF3, 0x11EF6), (0x16F4F, 0x16F4F), (0x16F7F, 0x16F87), (0x16FE4, 0x16FE4), (0x16FF0, 0x16FF1),
    (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46), (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF),
)
_PUNCTUATION_ADDED = frozenset("\u166d\U000111c9")
_MARK_ADDED = frozenset("\u1cf2\u1cf3")
_OTHER_EXCLUDED = frozenset("\u0890\u0891\u08e2\U000110cd" + "".join(map(chr, range(0x13430, 0x13439))))
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
# Unicode's White_Space property.
WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                        "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def is_punctuation(c: str) -> bool:
    """ASCII punctuation (``$+<=>^`|~`` included) or a character of a P* category."""
    if c in _ASCII_PUNCTUATION or c in _PUNCTUATION_ADDED:
        return True
    return unicodedata.category(c)[0] == "P" and not _in(_PUNCTUATION_EXCLUDED, c)


def is_mark(c: str) -> bool:
    """A combining mark (categories Mn, Mc, Me): what accent stripping removes."""
    if c in _MARK_ADDED:
        return True
    return unicodedata.category(c)[0] == "M" and not _in(_MARK_EXCLUDED, c)


def is_control(c: str) -> bool:
    """A control, format, private-use or surrogate character, except tab, newline and carriage return."""
    if c in "\t\n\r" or c in _OTHER_EXCLUDED:
        return False
    return unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")


def is_cjk(c: str) -> bool:
    """A CJK ideograph of the blocks BERT pads with spaces."""
    cp = ord(c)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B81F
            or 0x2B920 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def lowercase(text: str) -> str:
    """Each character lower-cased on its own (no context rule: a final capital sigma becomes 'σ')."""
    return text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)


def strip_marks(text: str) -> str:
    return "".join(c for c in text if not is_mark(c))


def whitespace_pattern():
    """The Whitespace pre-tokenizer's ``\\w+|[^\\w\\s]+``, with the word class narrowed as above."""
    starts, stops = _WORD_EXCLUDED
    excluded = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in zip(starts, stops))
    return regex_module().compile(f"[^\\W{excluded}]+|(?:[^\\w\\s]|[{excluded}])+")


# ----------------------------------------------------------------------------- normalizers

NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD", "Prepend", "Replace", "Sequence", "BertNormalizer", "Lowercase", "Strip",
               "StripAccents", "Nmt", "Precompiled")

# Nmt: ASCII controls it drops, and characters it reads as a space.
_NMT_DROPPED = frozenset(map(chr, [*range(0x01, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0x8F, 0x9F]))
_NMT_SPACE = {ord(c): " " for c in "\t\n\x0c\r\u1680\u200b\u200c\u200d\u200e\u200f\u2028\u2029\u2581\ufeff\ufffd"}
_NMT_TABLE = {**{ord(c): None for c in _NMT_DROPPED}, **_NMT_SPACE}


def bert_normalizer(clean_text: bool, chinese: bool, strip_accents: bool, lower: bool) -> Callable[[str], str]:
    """BERT's normalizer: drop controls and map whitespace to ' ', pad CJK ideographs with spaces,
    strip accents (NFD, then drop combining marks), lower-case -- each stage when asked, in that order."""

    def normalize(s: str) -> str:
        if clean_text:
            s = "".join(" " if c in WHITE_SPACE else c for c in s
                        if not (c == "\x00" or c == "\ufffd" or is_control(c)))
        if chinese:
            s = "".join(f" {c} " if is_cjk(c) else c for c in s)
        if strip_accents:
            s = strip_marks(unicodedata.normalize("NFD", s))
        if lower:
            s = lowercase(s)
        return s

    return normalize


class Normalizer:
    """A normalizer ``str -> str`` that also says whether the first character it returns still comes
    from the first character of its input.

    The reference implementation tracks, for every normalized character, the original characters it
    comes from; Metaspace's ``prepend_scheme: "first"`` prepends only to a piece whose first character
    comes from offset 0 of the text. That link is lost when a normalizer drops the first character
    (a control character, leading whitespace under Strip, a leading combining mark under
    StripAccents) or replaces a match of two or more characters (or by nothing) at the start; it
    survives every other change (case, Unicode forms, a one-character replacement, Prepend, and any
    change a Precompiled map makes).
    ``loses_first(s)`` says whether this normalizer cuts the link for input ``s``.
    """

    def __init__(self, fn: Callable[[str], str], loses_first: Optional[Callable[[str], bool]] = None):
        self.fn, self.loses_first = fn, loses_first

    def __call__(self, s: str) -> str:
        return self.fn(s)

    def track(self, s: str) -> Tuple[str, bool]:
        """(normalized ``s``, whether its first character still comes from the first character of ``s``)."""
        return self.fn(s), not (s and self.loses_first is not None and self.loses_first(s))


class SequenceNormalizer(Normalizer):
    def __init__(self, steps: List[Normalizer]):
        self.steps = steps
        super().__init__(self._apply)

    def _apply(self, s: str) -> str:
        for f in self.steps:
            s = f(s)
        return s

    def track(self, s: str) -> Tuple[str, bool]:
        kept = True
        for f in self.steps:
            s, k = f.track(s)
            kept = kept and k
        return s, kept


def _replace_loses_first(compiled, content: str) -> Callable[[str], bool]:
    def loses(s: str) -> bool:
        start, end, is_match = find_spans(compiled, s)[0]
        return is_match and start == 0 and (end >= 2 or (end == 1 and not content))

    return loses


class PrecompiledCharsmap(Normalizer):
    """SentencePiece's precompiled normalization map (ALBERT, T5, XLNet, mBART files).

    The map is ``u32 n`` (little-endian), a darts-clone double-array trie of n bytes over UTF-8 keys,
    then a pool of NUL-terminated replacement strings that the trie's values index. The text is
    read one grapheme cluster at a time: a cluster of fewer than 6 UTF-8 bytes for which some key
    is a prefix of it becomes the replacement of the *shortest* such key (the whole cluster, even
    when the key covers only its start, as the reference does); any other cluster is read character
    by character the same way, a character with no key staying as it is.
    """

    def __init__(self, data: bytes, fail: Callable[[str], ValueError]):
        if len(data) < 4:
            raise fail(f"expected at least 4 bytes, got {len(data)}")
        (size,) = struct.unpack_from("<I", data)
        if size % 4 or size == 0 or 4 + size > len(data):
            raise fail(f"trie size {size} does not fit the {len(data)} bytes of the map")
        self.units = struct.unpack_from(f"<{size // 4}I", data, 4)
        self.pool = data[4 + size:]
        try:
            self.pool.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(f"replacement strings are not UTF-8 ({exc})") from None
        self._cache: Dict[str, Optional[str]] = {}
        self._graphemes = regex_module().compile(r"\X")
        # The reference rewrites the whole text in one pass that never marks a removal, so its first
        # output character is always linked to the first input character.
        super().__init__(self._normalize)

    def _values(self, key: bytes) -> List[int]:
        """Trie values of the keys that are prefixes of ``key``, shortest first."""
        units = self.units
        out: List[int] = []

        def offset(unit: int) -> int:
            return (unit >> 10) << ((unit & (1 << 9)) >> 6)

        pos = offset(units[0])
        for c in key:
            if c == 0:
                break
            pos ^= c
            if pos >= len(units) or units[pos] & ((1 << 31) | 0xFF) != c:
                break
            unit = units[pos]
            pos ^= offset(unit)
            if (unit >> 8) & 1:
                if pos >= len(units):
                    break
                out.append(units[pos] & ((1 << 31) - 1))
        return out

    def transform(self, chunk: str) -> Optional[str]:
        """The replacement of the shortest key that starts ``chunk``, None if there is none."""
        if chunk in self._cache:
            return self._cache[chunk]
        values = self._values(chunk.encode("utf-8"))
        result = None
        if values:
            start = values[0]
            end = self.pool.find(b"\0", start)
            result = self.pool[start: len(self.pool) if end < 0 else end].decode("utf-8", errors="replace")
        self._cache[chunk] = result
        return result

    def _pieces(self, s: str):
        """(grapheme, its replacement or None to read it character by character)."""
        for g in self._graphemes.findall(s):
            yield g, self.transform(g) if len(g.encode("utf-8")) < 6 else None

    def _normalize(self, s: str) -> str:
        out: List[str] = []
        for g, norm in self._pieces(s):
            if norm is not None:
                out.append(norm)
                continue
            for c in g:
                t = self.transform(c)
                out.append(c if t is None else t)
        return "".join(out)


def build_normalizer(reader: Reader, spec: Any, where: str = "normalizer") -> Optional[Normalizer]:
    if spec is None:
        return None
    kind = reader.type_of(spec, where, NORMALIZERS)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return Normalizer(lambda s, form=kind: unicodedata.normalize(form, s))
    if kind == "Prepend":
        prefix = reader.get(spec, "prepend", str, where)
        return Normalizer(lambda s: prefix + s if s else s)
    if kind == "Replace":
        compiled = reader.pattern(spec, "pattern", where)
        content = reader.get(spec, "content", str, where)
        return Normalizer(lambda s: replace_all(compiled, s, content), _replace_loses_first(compiled, content))
    if kind == "BertNormalizer":
        clean_text = reader.get(spec, "clean_text", bool, where, True)
        chinese = reader.get(spec, "handle_chinese_chars", bool, where, True)
        strip_accents = reader.get(spec, "strip_accents", (bool, None), where, None)
        lower = reader.get(spec, "lowercase", bool, where, True)
        strip_accents = lower if strip_accents is None else strip_accents

        def bert_loses_first(s: str) -> bool:
            if clean_text and (s[0] in "\x00\ufffd" or is_control(s[0])):
                return True
            return strip_accents and is_mark(unicodedata.normalize("NFD", s)[0])

        return Normalizer(bert_normalizer(clean_text, chinese, strip_accents, lower), bert_loses_first)
    if kind == "Lowercase":
        return Normalizer(lowercase)
    if kind == "StripAccents":
        return Normalizer(strip_marks, lambda s: is_mark(s[0]))
    if kind == "Strip":
        left = reader.get(spec, "strip_left", bool, where, True)
        right = reader.get(spec, "strip_right", bool, where, True)
        spaces = "".join(sorted(WHITE_SPACE))
        loses = (lambda s: s[0] in WHITE_SPACE) if left else None
        if left and right:
            return Normalizer(lambda s: s.strip(spaces), loses)
        if left:
            return Normalizer(lambda s: s.lstrip(spaces), loses)
        return Normalizer((lambda s: s.rstrip(spaces)) if right else (lambda s: s))
    if kind == "Nmt":
        return Normalizer(lambda s: s.translate(_NMT_TABLE), lambda s: s[0] in _NMT_DROPPED)
    if kind == "Precompiled":
        charsmap = reader.get(spec, "precompiled_charsmap", (str, None), where, None)
        if not charsmap:
            return Normalizer(lambda s: s)
        try:
            data = base64.b64decode(charsmap, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise reader.fail(f"{where}.precompiled_charsmap", f"not base64 ({exc})") from None
        return PrecompiledCharsmap(data, lambda message: reader.fail(f"{where}.precompiled_charsmap", message))
    parts = reader.get(spec, "normalizers", list, where)
    steps = [build_normalizer(reader, p, f"{where}.normalizers[{i}]") for i, p in enumerate(parts)]
    return SequenceNormalizer([f for f in steps if f is not None])


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

PRE_TOKENIZERS = ("ByteLevel", "Split", "Metaspace", "Digits", "Sequence", "BertPreTokenizer", "Whitespace",
                  "WhitespaceSplit", "Punctuation")
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
    if kind in ("BertPreTokenizer", "WhitespaceSplit"):
        # Whitespace separates words and is dropped; BERT also isolates each punctuation character.
        bert = kind == "BertPreTokenizer"

        def split_words(pieces: List[Piece]) -> List[Piece]:
            pieces = split_pieces(pieces, lambda t: char_spans(t, WHITE_SPACE.__contains__), "Removed")
            return split_pieces(pieces, lambda t: char_spans(t, is_punctuation), "Isolated") if bert else pieces

        return split_words
    if kind == "Whitespace":
        compiled = whitespace_pattern()
        return lambda pieces: split_pieces(pieces, lambda t: find_spans(compiled, t), "Removed", invert=True)
    if kind == "Punctuation":
        behavior = reader.get(spec, "behavior", str, where, "Isolated")
        if behavior not in BEHAVIORS:
            raise reader.fail(f"{where}.behavior", f"expected one of {BEHAVIORS}, got {behavior!r}")
        return lambda pieces: split_pieces(pieces, lambda t: char_spans(t, is_punctuation), behavior)
    return _chain(reader, spec, where, "pretokenizers", build_pre_tokenizer)


# ----------------------------------------------------------------------------- post-processors

POST_PROCESSORS = ("ByteLevel", "TemplateProcessing", "Sequence", "BertProcessing", "RobertaProcessing")
# An encoding in the making: ids, whether each was added by a post-processor, and its token type id.
Encoding = Tuple[List[int], List[bool], List[int]]
# A post-processor takes the encodings of the sequence (and of its pair) and whether to add special tokens,
# and returns one or two encodings (without special tokens a template still sets the type ids its sequences
# name, RoBERTa's sets every type id to 0, BERT's leaves them).
PostProcessor = Callable[[List[Encoding], bool], List[Encoding]]


def _special(reader: Reader, spec: Dict[str, Any], key: str, where: str) -> int:
    """A ``[token, id]`` field of BertProcessing / RobertaProcessing: the id."""
    value = reader.get(spec, key, list, where)
    if len(value) != 2 or not isinstance(value[0], str) or not isinstance(value[1], int) or isinstance(
            value[1], bool) or value[1] < 0:
        raise reader.fail(f"{where}.{key}", f"expected [token, non-negative id], got {value!r:.80}")
    return value[1]


def _template(reader: Reader, spec: Dict[str, Any], key: str, where: str, special_ids: Dict[str, List[int]]):
    """A template as a list of (ids or None for a sequence, which sequence 'A'/'B', type id)."""
    items = reader.get(spec, key, (list, None), where, None)
    if items is None:
        return None
    template: List[Tuple[Optional[List[int]], str, int]] = []
    for i, item in enumerate(items):
        w = f"{where}.{key}[{i}]"
        item = reader.obj(item, w)
        if len(item) != 1 or next(iter(item)) not in ("SpecialToken", "Sequence"):
            raise reader.fail(w, f"expected {{'SpecialToken': ...}} or {{'Sequence': ...}}, got {item!r:.80}")
        (part, body), = item.items()
        body = reader.obj(body, f"{w}.{part}")
        name = reader.get(body, "id", str, f"{w}.{part}")
        type_id = reader.get(body, "type_id", int, f"{w}.{part}", 0)
        if type_id < 0:
            raise reader.fail(f"{w}.{part}.type_id", f"expected a non-negative int, got {type_id}")
        if part == "Sequence":
            if name not in ("A", "B") or (key == "single" and name == "B"):
                allowed = "'A'" if key == "single" else "'A' or 'B'"
                raise reader.fail(f"{w}.{part}.id", f"expected {allowed}, got {name!r}")
            template.append((None, name, type_id))
        elif name not in special_ids:
            raise reader.fail(f"{w}.{part}.id", f"special token {name!r} is not in {where}.special_tokens")
        else:
            template.append((special_ids[name], name, type_id))
    return template


def _fill(template, encodings: List[Encoding]) -> List[Encoding]:
    ids: List[int] = []
    added: List[bool] = []
    types: List[int] = []
    for chunk, name, type_id in template:
        if chunk is None:
            chunk = encodings[0 if name == "A" else 1][0]
            added.extend([False] * len(chunk))
        else:
            added.extend([True] * len(chunk))
        ids.extend(chunk)
        types.extend([type_id] * len(chunk))
    return [(ids, added, types)]


def build_post_processor(reader: Reader, spec: Any, where: str = "post_processor") -> Optional[PostProcessor]:
    if spec is None:
        return None
    kind = reader.type_of(spec, where, POST_PROCESSORS)
    if kind == "ByteLevel":  # changes offsets only, never ids
        return lambda encodings, add_special: encodings
    if kind in ("BertProcessing", "RobertaProcessing"):
        sep, cls = _special(reader, spec, "sep", where), _special(reader, spec, "cls", where)
        if kind == "RobertaProcessing":
            reader.get(spec, "trim_offsets", bool, where, True)
            reader.get(spec, "add_prefix_space", bool, where, True)
            # <s> A </s> and <s> A </s></s> B </s>, every type id 0.
            single = [([cls], "", 0), (None, "A", 0), ([sep], "", 0)]
            pair = single + [([sep], "", 0), (None, "B", 0), ([sep], "", 0)]
        else:
            # [CLS] A [SEP] and [CLS] A [SEP] B [SEP], the second part of type 1.
            single = [([cls], "", 0), (None, "A", 0), ([sep], "", 0)]
            pair = single + [(None, "B", 1), ([sep], "", 1)]
        roberta = kind == "RobertaProcessing"

        def bert_or_roberta(encodings: List[Encoding], add_special: bool) -> List[Encoding]:
            if add_special:
                return _fill(single if len(encodings) == 1 else pair, encodings)
            return [(ids, added, [0] * len(ids)) for ids, added, _ in encodings] if roberta else encodings

        return bert_or_roberta
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
        single = _template(reader, spec, "single", where, special_ids)
        if single is None:
            raise reader.fail(f"{where}.single", "expected a template, got null")
        pair = _template(reader, spec, "pair", where, special_ids)

        def template_processing(encodings: List[Encoding], add_special: bool) -> List[Encoding]:
            # Without special tokens the template still gives each sequence its type id.
            template = single if len(encodings) == 1 else pair
            if template is None:
                raise ValueError(f"{reader.file}: {where}: has no 'pair' template, cannot encode a pair")
            return _fill(template if add_special else [t for t in template if t[0] is None], encodings)

        return template_processing
    parts = reader.get(spec, "processors", list, where)
    steps = [build_post_processor(reader, p, f"{where}.processors[{i}]") for i, p in enumerate(parts)]
    steps = [f for f in steps if f is not None]

    def sequence(encodings: List[Encoding], add_special: bool) -> List[Encoding]:
        for f in steps:
            encodings = f(encodings, add_special)
        return encodings

    return sequence


# ----------------------------------------------------------------------------- decoders

DECODERS = ("ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip", "Sequence", "WordPiece")
# WordPiece's clean-up: spaces the decoder put before punctuation and English contractions, removed.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def cleanup(text: str) -> str:
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text
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
    if kind == "WordPiece":
        prefix = reader.get(spec, "prefix", str, where, "##")
        clean = reader.get(spec, "cleanup", bool, where, True)

        def wordpiece(tokens: List[str]) -> List[str]:
            # A token after the first joins the previous one when it carries the prefix, else follows a space.
            out = []
            for i, t in enumerate(tokens):
                if i:
                    t = t.replace(prefix, "", 1) if t.startswith(prefix) else " " + t
                out.append(cleanup(t) if clean else t)
            return out

        return wordpiece
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
