"""``npformer.decoding`` against Hugging Face's ``generate`` on tiny random BART and T5 models.

``HFSeq2Seq`` puts a transformers encoder-decoder behind the encoder-decoder interface: ``encode``
runs the HF encoder; ``decode`` runs the HF decoder without its own cache, over the whole prefix,
which it keeps in a one-position-wide ``KVCache`` (the ids as floats), so the beam reordering of
``npformer.decoding`` moves the prefixes exactly as it moves a model's keys and values. The
sequences must be identical and the beam scores (``sequences_scores``) equal at float32's 1e-5.

BART's config would force eos at the maximum length (``forced_eos_token_id``); it is switched off
here, as ``npformer.decoding`` has no such processor. HF's random initialisation (std 0.02) gives
nearly uniform logits, whose near-ties would make the comparison one of round-off, so every
parameter is redrawn larger, and the eos logit is raised so that hypotheses end at many lengths.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer import decoding
from npformer.nn.attention import KVCache
from tests.tolerances import HF_LOGITS_RTOL, assert_close

transformers = pytest.importorskip("transformers")
# generate warns of a min_new_tokens beyond max_new_tokens; the decoding functions take it too
pytestmark = pytest.mark.filterwarnings("ignore:Unfeasible length constraints")

V = 40
F32 = HF_LOGITS_RTOL[np.dtype(np.float32)]


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "bart":
        config = transformers.BartConfig(
            vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, forced_bos_token_id=None,
            forced_eos_token_id=None, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
        model = transformers.BartForConditionalGeneration(config)
    else:
        config = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                       dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                       tie_word_embeddings=False)
        model = transformers.T5ForConditionalGeneration(config)
    g = torch.Generator().manual_seed(seed)
    eos = config.eos_token_id
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.5
            if "norm" in name and name.endswith("weight"):
                noise += 1.0
            p.copy_(noise)
        if kind == "bart":
            model.final_logits_bias[0, eos] = 3.0
    if kind == "t5":  # no logit bias: the eos row of the head along the mean input of the head, for a logit near 5
        seen = []
        hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        with torch.no_grad():
            src = torch.randint(3, V, (8, 6), generator=g)
            model(input_ids=src, decoder_input_ids=torch.randint(3, V, (8, 6), generator=g))
            hook.remove()
            mean = seen[0].reshape(-1, seen[0].shape[-1]).mean(0)
            model.lm_head.weight[eos] = 5.0 * mean / mean.dot(mean)
    return model.eval()


class HFSeq2Seq:
    """A transformers encoder-decoder behind npformer's encoder-decoder interface (see the module's notes)."""

    def __init__(self, hf):
        self.hf = hf
        c = hf.config
        self.cfg = SimpleNamespace(vocab_size=c.vocab_size, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
                                   decoder_start_token_id=c.decoder_start_token_id)
        self.training = False

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    @staticmethod
    def _attention_mask(src_padding_mask):
        return None if src_padding_mask is None else torch.from_numpy(~src_padding_mask).long()

    def encode(self, src_ids, src_padding_mask=None):
        with torch.no_grad():
            out = self.hf.get_encoder()(input_ids=torch.from_numpy(np.ascontiguousarray(src_ids)),
                                        attention_mask=self._attention_mask(src_padding_mask))
        return out.last_hidden_state.numpy()

    def make_decoder_caches(self, batch, max_len, src_len):
        # the prefix ids in a self cache of one head of width 1; the cross cache is unused
        return [(KVCache(batch, 1, max_len, 1, np.float64), KVCache(batch, 1, src_len, 1, np.float64))]

    def decode(self, tgt_ids, memory, caches=None, *, src_padding_mask=None):
        if caches is None:
            prefix = tgt_ids
        else:
            as_float = tgt_ids[:, None, :, None].astype(np.float64)
            prefix = caches[0][0].append(as_float, as_float)[0][:, 0, :, 0].astype(np.int64)
        with torch.no_grad():
            out = self.hf(encoder_outputs=(torch.from_numpy(memory),),
                          attention_mask=self._attention_mask(src_padding_mask),
                          decoder_input_ids=torch.from_numpy(prefix), use_cache=False)
        return out.logits[:, -tgt_ids.shape[1]:].numpy()


@pytest.fixture(scope="module")
def models():
    return {kind: build(kind) for kind in ("bart", "t5")}


def source(seed, B, S, with_mask):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, V, (B, S))
    mask = np.zeros((B, S), bool)
    if with_mask:
        for b in range(B):
            mask[b, rng.integers(1, S + 1):] = True
    return src, mask


def hf_generate(hf, src, mask, **kw):
    return hf.generate(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(~mask).long(),
                       do_sample=False, return_dict_in_generate=True, output_scores=True, **kw)


SETTINGS = dict(
    seed=st.integers(0, 2**16), B=st.integers(1, 3), S=st.sampled_from([1, 4, 7]), with_mask=st.booleans(),
    num_beams=st.integers(2, 4), length_penalty=st.sampled_from([0.5, 1.0, 2.0]),
    early_stopping=st.sampled_from([True, False, "never"]), ngram=st.sampled_from([0, 2, 3]),
    max_new_tokens=st.integers(1, 12), min_new_tokens=st.sampled_from([0, 0, 2]), R=st.integers(1, 4))


@pytest.mark.parametrize("kind", ["bart", "t5"])
@settings(max_examples=20)
@given(**SETTINGS)
def test_beam_search_equals_hf_generate(models, kind, seed, B, S, with_mask, num_beams, length_penalty,
                                        early_stopping, ngram, max_new_tokens, min_new_tokens, R):
    hf = models[kind]
    R = min(R, num_beams)
    src, mask = source(seed, B, S, with_mask)
    kw = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
              early_stopping=early_stopping, no_repeat_ngram_size=ngram, num_return_sequences=R,
              min_new_tokens=min_new_tokens)
    expected = hf_generate(hf, src, mask, **kw)
    ids, scores = decoding.beam_search(HFSeq2Seq(hf), src, src_padding_mask=mask, **kw)
    np.testing.assert_array_equal(ids, expected.sequences.numpy())
    assert_close(scores, expected.sequences_scores.numpy(), rtol=F32, what="sequences_scores")


@pytest.mark.parametrize("kind", ["bart", "t5"])
@given(seed=SETTINGS["seed"], B=SETTINGS["B"], S=SETTINGS["S"], with_mask=SETTINGS["with_mask"],
       ngram=SETTINGS["ngram"], max_new_tokens=SETTINGS["max_new_tokens"], min_new_tokens=SETTINGS["min_new_tokens"])
def test_greedy_equals_hf_generate(models, kind, seed, B, S, with_mask, ngram, max_new_tokens, min_new_tokens):
    hf = models[kind]
    src, mask = source(seed, B, S, with_mask)
    kw = dict(max_new_tokens=max_new_tokens, no_repeat_ngram_size=ngram, min_new_tokens=min_new_tokens)
    expected = hf_generate(hf, src, mask, num_beams=1, **kw).sequences.numpy()
    np.testing.assert_array_equal(decoding.greedy(HFSeq2Seq(hf), src, src_padding_mask=mask, **kw), expected)
    ids, _ = decoding.beam_search(HFSeq2Seq(hf), src, src_padding_mask=mask, num_beams=1, **kw)
    np.testing.assert_array_equal(ids, expected)  # one beam is greedy search, as in generate


def test_the_cases_end_at_many_lengths(models):
    """The comparisons above mean something only if hypotheses end early, with pad (or eos) after them."""
    for kind, hf in models.items():
        src, mask = source(7, 3, 5, True)
        out = hf_generate(hf, src, mask, num_beams=4, num_return_sequences=4, max_new_tokens=10).sequences.numpy()
        eos = hf.config.eos_token_id
        ends = [int(np.argmax(row[1:] == eos)) for row in out if (row[1:] == eos).any()]
        assert len(set(ends)) >= 2, (kind, out)


@pytest.fixture(scope="module")
def loaded(models, tmp_path_factory):
    """Each HF model saved and read back by npformer (float64 and float32): npformer's own encoder-decoder."""
    from npformer.hf import load_pretrained

    out = {}
    for kind, hf in models.items():
        folder = tmp_path_factory.mktemp(f"{kind}_folder")
        hf.save_pretrained(folder)
        out[kind] = {dtype: load_pretrained(folder, dtype=dtype) for dtype in ("float32", "float64")}
    return out


@pytest.mark.parametrize("kind", ["bart", "t5"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@settings(max_examples=10)
@given(**SETTINGS)
def test_npformer_models_decode_as_hf_generate(models, loaded, kind, dtype, seed, B, S, with_mask, num_beams,
                                               length_penalty, early_stopping, ngram, max_new_tokens,
                                               min_new_tokens, R):
    """The npformer T5 and BART loaded from the HF folder, decoding with their own KV caches (self attention
    growing, cross attention computed once): the same sequences as HF generate, beam scores at 1e-5."""
    hf, ours = models[kind], loaded[kind][dtype]
    R = min(R, num_beams)
    src, mask = source(seed, B, S, with_mask)
    kw = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
              early_stopping=early_stopping, no_repeat_ngram_size=ngram, num_return_sequences=R,
              min_new_tokens=min_new_tokens)
    expected = hf_generate(hf, src, mask, **kw)
    ids, scores = decoding.beam_search(ours, src, src_padding_mask=mask, **kw)
    np.testing.assert_array_equal(ids, expected.sequences.numpy())
    assert_close(scores, expected.sequences_scores.numpy(), rtol=F32, what="sequences_scores")
    greedy_kw = dict(max_new_tokens=max_new_tokens, no_repeat_ngram_size=ngram, min_new_tokens=min_new_tokens)
    np.testing.assert_array_equal(decoding.greedy(ours, src, src_padding_mask=mask, **greedy_kw),
                                  hf_generate(hf, src, mask, num_beams=1, **greedy_kw).sequences.numpy())


@pytest.mark.parametrize("kind", ["bart", "t5"])
@settings(max_examples=8)
@given(seed=SETTINGS["seed"], B=SETTINGS["B"], S=SETTINGS["S"], with_mask=SETTINGS["with_mask"],
       num_beams=st.integers(1, 3), max_new_tokens=st.integers(1, 8), forced=st.sampled_from(["eos", "bos", "both"]))
def test_forced_first_and_last_tokens_as_hf_generate(models, loaded, kind, seed, B, S, with_mask, num_beams,
                                                     max_new_tokens, forced):
    """forced_bos_token_id / forced_eos_token_id (BART's config.json sets forced_eos_token_id): the first new
    token and the one at the maximum length are forced, in greedy and beam search, as in generate."""
    hf, ours = models[kind], loaded[kind]["float64"]
    src, mask = source(seed, B, S, with_mask)
    kw = dict(max_new_tokens=max_new_tokens, num_beams=num_beams)
    if forced in ("eos", "both"):
        kw["forced_eos_token_id"] = hf.config.eos_token_id
    if forced in ("bos", "both"):
        kw["forced_bos_token_id"] = 7
    expected = hf_generate(hf, src, mask, **kw)
    if num_beams == 1:
        ids = decoding.greedy(ours, src, src_padding_mask=mask, **{k: v for k, v in kw.items() if k != "num_beams"})
    else:
        ids, scores = decoding.beam_search(ours, src, src_padding_mask=mask, **kw)
        assert_close(scores, expected.sequences_scores.numpy(), rtol=F32, what="sequences_scores")
    np.testing.assert_array_equal(ids, expected.sequences.numpy())
    if "forced_bos_token_id" in kw and not ("forced_eos_token_id" in kw and max_new_tokens == 1):
        assert (ids[:, 1] == 7).all()
