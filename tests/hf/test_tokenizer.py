"""npformer.hf.tokenizer against the ``tokenizers`` library, on tokenizers built here.

Each family (GPT-2, LLaMA-3, Qwen2, LLaMA-2/Mistral and its Metaspace variants) is trained
with ``tokenizers``' BpeTrainer on a small in-test corpus, saved as ``tokenizer.json`` and
read back by npformer. Ids from ``encode`` and text from ``decode`` must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("regex")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from npformer.hf.tokenizer import HFTokenizer, load_tokenizer

# LLaMA-3's pre-tokenizer pattern; Qwen2's is the same with single digits (\p{N} instead of \p{N}{1,3}).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEXTS = [
    "",
    " ",
    "a",
    "Hello world",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    else:\n        return -x\n",
    "The quick brown fox jumps over the lazy dog. It's 12345678 o'clock!",
    "I'LL don't you've we're she'd THEY'RE it's",
    "Größe, Straße, über; garçon, élève, naïve, Noël, cœur",
    "Αλφαβητικός κατάλογος — Ελληνικά",
    "Съешь же ещё этих мягких французских булок",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "你好，世界！我们在学习分词。",
    "こんにちは世界、カタカナとひらがな。",
    "안녕하세요 세계, 토큰화 테스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇩🇪🇫🇷🇯🇵 heart ❤️",
    "lines\n\n\nthree blank   three spaces\t\ttabs\r\nwindows  ",
    "   leading and trailing spaces   ",
    "\n",
    "\r\n\r\n",
    "numbers 12345678 3.14159 1,000,000 -42 ٣٤٥ ①②",
    "special <|endoftext|> mid<|endoftext|>text",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhey<|im_end|>",
    "<s> [INST] hello [/INST] answer</s><s>again",
    "<s>hello</s> <unk> ▁already▁spaced ▁",
    "mixed 中文 and English and Русский 123abc",
    "zero\u200bwidth and nbsp\u00a0here and ideographic\u3000space",
    "combining e\u0301 vs \u00e9 and Å vs A\u030a, ligature ﬁ",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "x" * 50 + " " + "ab" * 30,
]

CORPUS_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part def return class import self print if else elif while for range len"
).split()


def corpus():
    lines = []
    for i in range(400):
        words = [CORPUS_WORDS[(i * 7 + j * 13) % len(CORPUS_WORDS)] for j in range(12)]
        sep = ["  ", "\n", " ", "\t", ", ", ". "][i % 6]
        lines.append(sep.join(words) + f" {i * 37} {i}")
    return lines + TEXTS * 3


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _byte_level_bpe(pre, specials, normalizer=None, ignore_merges=False, vocab_size=700):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def build_gpt2():
    tok = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_gpt2_prefix_space():
    tok = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=True), ["<|endoftext|>"], vocab_size=400)
    return tok


def build_llama3():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = _byte_level_bpe(pre, specials, ignore_merges=True)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


def build_qwen2():
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = _byte_level_bpe(pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizer=normalizers.NFC())
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False),
                    AddedToken("</tool_call>", special=False, normalized=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _llama2(normalizer, pre, decoder, limit_alphabet=60):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre is not None:
        tok.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(
        vocab_size=3 + 256 + 400,
        special_tokens=["<unk>", "<s>", "</s>"] + BYTE_TOKENS,
        limit_alphabet=limit_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    # The byte tokens belong to the vocabulary only, as in LLaMA-2's file: they are not added tokens.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoder
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


LLAMA2_DECODER = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
)


def build_llama2():
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return _llama2(norm, None, LLAMA2_DECODER)


def build_mistral_metaspace():
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return _llama2(None, pre, LLAMA2_DECODER)


def build_metaspace_split():
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return _llama2(None, pre, decoders.Metaspace(replacement="▁", prepend_scheme="always"))


BUILDERS = {
    "gpt2": build_gpt2,
    "gpt2_prefix_space": build_gpt2_prefix_space,
    "llama3": build_llama3,
    "qwen2": build_qwen2,
    "llama2": build_llama2,
    "mistral_metaspace": build_mistral_metaspace,
    "metaspace_split": build_metaspace_split,
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (oracle, npformer tokenizer read from the oracle's saved tokenizer.json)."""
    out = {}
    root = tmp_path_factory.mktemp("tokenizers")
    for name, build in BUILDERS.items():
        oracle = build()
        path = root / f"{name}.json"
        oracle.save(str(path))
        out[name] = (oracle, HFTokenizer.from_file(path))
    return out


def check_same(oracle, ours, text):
    for add in (True, False):
        expected = oracle.encode(text, add_special_tokens=add).ids
        got = ours.encode(text, add_special_tokens=add)
        assert got == expected, (text, add)
    for skip in (True, False):
        assert ours.decode(expected, skip_special_tokens=skip) == oracle.decode(expected, skip_special_tokens=skip)


NAMES = sorted(BUILDERS)


@pytest.mark.parametrize("name", NAMES)
def test_fixed_texts_encode_and_decode_as_the_oracle(pairs, name):
    oracle, ours = pairs[name]
    for text in TEXTS:
        check_same(oracle, ours, text)
    assert ours.encode("") == oracle.encode("").ids


def test_fixed_texts_exercise_the_interesting_paths(pairs):
    """The texts reach byte fallback, merges and chat tokens (else the comparisons prove little)."""
    _, llama2 = pairs["llama2"]
    ids = llama2.encode("你好 😀")
    assert any(llama2.id_to_token(i).startswith("<0x") for i in ids)
    _, gpt2 = pairs["gpt2"]
    ids = gpt2.encode("the people<|endoftext|>")
    assert len(ids) < len("the people") and ids[-1] == gpt2.token_to_id("<|endoftext|>")
    _, qwen = pairs["qwen2"]
    ids = qwen.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == qwen.token_to_id("<|im_start|>") and ids[-1] == qwen.token_to_id("<|im_end|>")
    _, llama3 = pairs["llama3"]
    assert llama3.encode("hi")[0] == llama3.token_to_id("<|begin_of_text|>")
    assert llama3.encode("hi", add_special_tokens=False)[0] != llama3.token_to_id("<|begin_of_text|>")


# Every assigned character (as this Python's Unicode tables see them). Code points assigned only in the
# newest Unicode versions are left out: the pattern engines of the two implementations carry tables of
# different Unicode versions, so such a character may be a letter (\p{L}) to one and not to the other.
ALL_UNICODE = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=60)
WEIGHTED = st.lists(
    st.one_of(
        st.sampled_from([" ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0"]),
        st.sampled_from(list("abcdefxyzAÉßçñ") + ["the", "people", "'s", "'LL", "don't"]),
        st.sampled_from(list("0123456789") + ["12345678", "٣"]),
        st.sampled_from(list(".,;:!?-_()[]{}'\"#@/\\*")),
        st.sampled_from(["😀", "👍🏽", "👨‍👩‍👧", "🇩🇪", "中", "日本", "한", "▁", "e\u0301"]),
        st.sampled_from(["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|eot_id|>", "<unk>", "<0x41>"]),
    ),
    max_size=40,
).map("".join)


@pytest.mark.parametrize("name", NAMES)
@given(text=ALL_UNICODE)
def test_any_unicode_text_matches_the_oracle(pairs, name, text):
    oracle, ours = pairs[name]
    check_same(oracle, ours, text)


@pytest.mark.parametrize("name", NAMES)
@given(text=WEIGHTED)
def test_weighted_text_matches_the_oracle(pairs, name, text):
    oracle, ours = pairs[name]
    check_same(oracle, ours, text)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10)
@given(data=st.data())
def test_decode_of_any_ids_matches_the_oracle(pairs, name, data):
    """Arbitrary id lists: cut UTF-8, lone byte tokens, unknown ids (skipped), special tokens."""
    oracle, ours = pairs[name]
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size + 3), max_size=20))
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", NAMES)
def test_vocabulary_matches_the_oracle(pairs, name):
    oracle, ours = pairs[name]
    assert ours.vocab_size == oracle.get_vocab_size(with_added_tokens=True)
    for token, i in oracle.get_vocab(with_added_tokens=True).items():
        assert ours.token_to_id(token) == i
        assert ours.id_to_token(i) == oracle.id_to_token(i)
    assert ours.token_to_id("no such token ☃☃") is None
    assert ours.id_to_token(ours.vocab_size + 10) is None


def test_added_token_flags_match_the_oracle(tmp_path):
    """lstrip, rstrip, single_word and normalized added tokens, with a normalizer that changes text."""
    tok = build_llama2()
    tok.add_tokens(
        [
            AddedToken("[L]", lstrip=True, normalized=False),
            AddedToken("[R]", rstrip=True, normalized=False),
            AddedToken("word", single_word=True, normalized=False),
            AddedToken("Ab", normalized=True),
        ]
    )
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True)])
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ours = HFTokenizer.from_file(path)
    texts = [
        "a  [L]  b  [R]  c", "[L][R][L]", "word words sword word_ word. (word)", "xAby Ab ＡＢ ab",
        "one <mask> two   <mask>", "\n[L]\n[R]\n", "wordword word",
    ]
    for text in texts:
        check_same(tok, ours, text)


@settings(max_examples=10)
@given(text=st.lists(st.sampled_from(["[L]", "[R]", "word", "Ab", "<mask>", " ", "  ", "x", "_", "\n", "é"]),
                     max_size=12).map("".join))
def test_added_token_flags_on_generated_text(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "flags_tokenizer.json"
    if not path.exists():
        tok = build_gpt2()
        tok.add_tokens([AddedToken("[L]", lstrip=True, normalized=False), AddedToken("[R]", rstrip=True),
                        AddedToken("word", single_word=True, normalized=False), AddedToken("Ab", normalized=True)])
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True)])
        tok.save(str(path))
    oracle = Tokenizer.from_file(str(path))
    check_same(oracle, HFTokenizer.from_file(path), text)


def test_split_behaviors_and_digits_match_the_oracle(tmp_path):
    """Every Split behavior, inverted or not, String and Regex patterns, and Digits."""
    base = build_gpt2()
    texts = ["a1b22c333 d,e,,f", "  x  y ", "12345678 and 9", "", ",,,", "k,1,m"]
    configs = []
    for behavior in ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous"):
        for invert in (False, True):
            configs.append(pre_tokenizers.Split(Regex(r"\d+|,"), behavior=behavior, invert=invert))
            configs.append(pre_tokenizers.Split(",", behavior=behavior, invert=invert))
    configs += [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Digits(individual_digits=False)]
    for k, split in enumerate(configs):
        base.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        path = tmp_path / f"split{k}.json"
        base.save(str(path))
        ours = HFTokenizer.from_file(path)
        for text in texts:
            check_same(base, ours, text)


def test_normalizer_forms_match_the_oracle(tmp_path):
    base = build_gpt2()
    text = "ﬁ Å A\u030a ① ｶ ｶﾞ e\u0301 Ω K"
    for k, norm in enumerate([normalizers.NFC(), normalizers.NFD(), normalizers.NFKC(), normalizers.NFKD(),
                              normalizers.Replace(Regex(r"\s+"), " ")]):
        base.normalizer = norm
        path = tmp_path / f"norm{k}.json"
        base.save(str(path))
        check_same(base, HFTokenizer.from_file(path), text + "  \t\n  x")


def test_merges_as_pairs_are_read_like_strings(pairs, tmp_path):
    """Newer files write each merge as [a, b]; older ones as "a b"; both load to the same tokenizer."""
    oracle, ours = pairs["gpt2"]
    spec = json.loads(oracle.to_str())
    spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    as_strings = tmp_path / "strings.json"
    as_strings.write_text(json.dumps(spec))
    spec["model"]["merges"] = [m.split(" ") for m in spec["model"]["merges"]]
    as_pairs = tmp_path / "pairs.json"
    as_pairs.write_text(json.dumps(spec))
    text = TEXTS[5] + TEXTS[4]
    expected = oracle.encode(text).ids
    assert HFTokenizer.from_file(as_strings).encode(text) == expected
    assert HFTokenizer.from_file(as_pairs).encode(text) == expected


def test_load_tokenizer_reads_the_config(pairs, tmp_path):
    oracle, _ = pairs["llama2"]
    oracle.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False},
        "pad_token": None,
        "add_bos_token": True,
        "chat_template": template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert tok.chat_template == template
    assert tok.encode("hi") == oracle.encode("hi").ids
    # add_bos_token False drops the BOS the post-processor puts first; True adds it where none is.
    config["add_bos_token"] = False
    config["pad_token"] = "<unk>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id == 0
    assert tok.encode("hi") == oracle.encode("hi", add_special_tokens=False).ids
    gpt2_oracle, gpt2 = pairs["gpt2"]
    gpt2_oracle.save(str(tmp_path / "gpt2.json"))
    plain = HFTokenizer.from_file(tmp_path / "gpt2.json", bos_token="<|endoftext|>", add_bos_token=True)
    assert plain.encode("hi") == [plain.bos_token_id] + gpt2.encode("hi")
    assert plain.encode("hi", add_special_tokens=False) == gpt2.encode("hi")


def test_load_tokenizer_without_config(pairs, tmp_path):
    oracle, _ = pairs["qwen2"]
    oracle.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id is None and tok.eos_token_id is None
    assert tok.chat_template == "{{ messages }}"
    assert tok.encode(TEXTS[23]) == oracle.encode(TEXTS[23]).ids


def test_encoding_100_kb_is_fast_and_exact(pairs):
    oracle, ours = pairs["llama3"]
    text = ("".join(TEXTS) * 200)[:100_000]
    start = time.perf_counter()
    ids = ours.encode(text)
    elapsed = time.perf_counter() - start
    assert ids == oracle.encode(text).ids
    assert elapsed < 10.0, f"encoding 100 kB took {elapsed:.2f} s"


def test_running_a_tokenizer_loads_neither_tokenizers_nor_torch(pairs, tmp_path):
    oracle, _ = pairs["qwen2"]
    path = tmp_path / "tokenizer.json"
    oracle.save(str(path))
    code = (
        "import sys\n"
        "from npformer.hf.tokenizer import HFTokenizer\n"
        f"tok = HFTokenizer.from_file({str(path)!r})\n"
        "ids = tok.encode('<|im_start|>hi there<|im_end|>')\n"
        "print(tok.decode(ids), sorted(m for m in ('tokenizers', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "<|im_start|>hi there<|im_end|> []"
