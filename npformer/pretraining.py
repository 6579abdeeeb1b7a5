"""Pre-training encoders and encoder-decoders with the trainer: which objectives each family takes, its
config, its batches, its loss.

``npformer train --model bert --objective mlm`` (or ``--model t5 --objective span``) runs the same
loop as a GPT run (AdamW, schedule, clipping, checkpoints, resume); what differs is gathered here:

- the objectives a family trains with (``OBJECTIVES``; the first is its default): for the
  encoders masked LM ("mlm"), whole-word masked LM ("wwm"), next-sentence prediction with MLM
  ("nsp"), sentence-order prediction ("sop"), replaced-token detection ("rtd"); for the
  encoder-decoders (``SEQ2SEQ``) T5's span corruption ("span"), BART's text infilling
  ("infill"), sentence permutation ("permute") and both ("permute+infill");
- the model's config from the run's options and the tokenizer: the character vocabulary
  plus four special ids after it ([CLS], [SEP], [MASK], [PAD], ``special_ids_for``), or for an
  encoder-decoder pad, eos, bos, mask and ``N_SENTINELS`` sentinels (``seq2seq_specials_for``);
- batches of ``npformer.data.objectives.pretraining_batches`` (``seq2seq_batches``) over the
  run's training (or validation) text, ``block_size`` tokens each (the encoder's input),
  drawn from the run's data generator (so a resumed run draws what the uninterrupted one would);
- one training forward of a batch, returning the loss (the model keeps its caches for
  ``backward()``).
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np

from .data.objectives import SpecialIds, pretraining_batches, special_ids_for
from .data.seq2seq_objectives import Seq2SeqSpecials, seq2seq_batches, seq2seq_specials, seq2seq_specials_for
from .models.albert import Albert, AlbertConfig
from .models.bart import Bart, BartConfig
from .models.bert import Bert, BertConfig
from .models.deberta import Deberta, DebertaConfig
from .models.electra import ElectraConfig, ElectraPretraining, ElectraPretrainingConfig
from .models.t5 import T5, T5Config
from .models.transformer import Transformer, TransformerConfig

# family -> the objectives it trains with, its default first. ALBERT's sentence-order prediction (SOP) and
# ELECTRA's replaced-token detection (RTD) each add to a masked LM; "rtd" batches are masked-LM batches.
ENCODER_OBJECTIVES: Dict[str, tuple] = {"bert": ("mlm", "wwm", "nsp"), "roberta": ("mlm", "wwm"),
                                        "deberta": ("mlm", "wwm"), "albert": ("sop", "mlm", "wwm"),
                                        "electra": ("rtd",)}
SEQ2SEQ_OBJECTIVES: Dict[str, tuple] = {"t5": ("span", "infill", "permute", "permute+infill"),
                                        "bart": ("infill", "permute+infill", "permute", "span"),
                                        "transformer": ("span", "infill", "permute", "permute+infill")}
OBJECTIVES: Dict[str, tuple] = {**ENCODER_OBJECTIVES, **SEQ2SEQ_OBJECTIVES}
ENCODERS = tuple(ENCODER_OBJECTIVES)
SEQ2SEQ = tuple(SEQ2SEQ_OBJECTIVES)
N_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>, at the top of an encoder-decoder's vocabulary


def specials_for(tokenizer, family: str = "bert"):
    """The special ids a ``family`` model adds after the tokenizer's: SpecialIds, or Seq2SeqSpecials."""
    if family in SEQ2SEQ:
        return seq2seq_specials_for(tokenizer, N_SENTINELS)
    return special_ids_for(tokenizer)


def model_config(family: str, objective: str, *, text_vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 d_model: int, dropout: float, dtype: str):
    """A new ``family`` model's config for a run on a tokenizer of ``text_vocab_size`` ids, the family's special
    ids after them."""
    shape = dict(block_size=block_size, n_layer=n_layer, n_head=n_head, d_model=d_model, dropout=dropout,
                 dtype=dtype)
    if family in SEQ2SEQ:
        return seq2seq_config(family, objective, specials=seq2seq_specials(text_vocab_size, N_SENTINELS), **shape)
    V = text_vocab_size
    return encoder_config(family, objective, vocab_size=V + 4, specials=SpecialIds(*range(V, V + 4), vocab_size=V + 4),
                          **shape)


def seq2seq_config(family: str, objective: str, *, specials: Seq2SeqSpecials, block_size: int, n_layer: int,
                   n_head: int, d_model: int, dropout: float, dtype: str):
    """The config of a new encoder-decoder for a run: ``n_layer`` layers in the encoder and in the decoder, a
    4 d_model wide feed-forward; the special ids of ``specials``, decoding starting where the objective's
    batches start it (pad for span corruption, as T5; eos for BART's objectives, as BART); learned or
    sinusoidal positions for 2 block_size tokens (a target may outgrow its source: infilling restores the
    masked spans)."""
    ids = dict(vocab_size=specials.vocab_size, pad_token_id=specials.pad, eos_token_id=specials.eos,
               decoder_start_token_id=specials.pad if objective == "span" else specials.eos)
    if family == "t5":  # T5 v1.1: gated GELU, untied head; heads of d_model / n_head
        return T5Config(**ids, d_model=d_model, d_kv=d_model // n_head, d_ff=4 * d_model, num_layers=n_layer,
                        n_head=n_head, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout=dropout,
                        dtype=dtype)
    shape = dict(**ids, max_position=2 * block_size, n_layer=n_layer,
                 n_head=n_head, d_model=d_model, d_ff=4 * d_model, dropout=dropout, dtype=dtype)
    if family == "bart":
        return BartConfig(**shape, bos_token_id=specials.bos)
    return TransformerConfig(**shape)


def encoder_config(family: str, objective: str, *, vocab_size: int, specials: SpecialIds, block_size: int,
                   n_layer: int, n_head: int, d_model: int, dropout: float, dtype: str):
    """The config of a new ``family`` model for a run: 4 d_model wide MLP, the tokenizer's vocabulary plus the
    four special ids, BERT's token types and NSP head when the objective needs them; RoBERTa's positions count
    from its padding id, so its position table holds pad + 1 + block_size rows."""
    assert specials.vocab_size == vocab_size
    shape = dict(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=4 * d_model,
                 dropout=dropout, pad_token_id=specials.pad, dtype=dtype)
    if family == "albert":  # factorized embedding: E = d_model / 2 (ALBERT's E << H, at this scale)
        return AlbertConfig(**shape, max_position=block_size, type_vocab_size=2, embedding_size=max(1, d_model // 2))
    if family == "electra":  # the paper's generator: a quarter of the discriminator's width (one head)
        small = max(1, d_model // 4)
        generator = ElectraConfig(**{**shape, "d_model": small, "n_head": 1, "d_ff": 4 * small},
                                  max_position=block_size, embedding_size=d_model)
        return ElectraPretrainingConfig(generator, ElectraConfig(**shape, max_position=block_size,
                                                                 embedding_size=d_model))
    if family == "deberta":  # DeBERTa-v3's relative positions: 256 log buckets up to 512, no absolute table
        return DebertaConfig(**shape, max_position=block_size, type_vocab_size=0)
    if family == "roberta":
        return BertConfig(**shape, max_position=specials.pad + 1 + block_size, type_vocab_size=1,
                          position_padding_idx=specials.pad, nsp_head=False)
    return BertConfig(**shape, max_position=block_size, type_vocab_size=2, nsp_head=objective == "nsp")


def batches(tokenizer, objective: str, text: str, *, batch_size: int, block_size: int, specials,
            rng: np.random.Generator) -> Iterator:
    """Endless batches of ``block_size`` tokens of ``text`` for ``objective``, drawn from ``rng``: dicts of
    arrays for an encoder, ``Seq2SeqBatch`` for an encoder-decoder (``specials`` of ``specials_for``)."""
    if isinstance(specials, Seq2SeqSpecials):
        return seq2seq_batches(tokenizer, objective, rng=rng, batch_size=batch_size, max_length=block_size,
                               specials=specials, text=text)
    return pretraining_batches(tokenizer, "mlm" if objective == "rtd" else objective, rng=rng, batch_size=batch_size,
                               max_length=block_size, specials=specials, text=text)


def forward(model, batch) -> float:
    """The loss of one batch: masked LM, plus the sentence-pair loss when the batch has its labels; an
    encoder-decoder's cross entropy over its targets."""
    if isinstance(model, (T5, Bart, Transformer)):
        _, loss = model.forward(batch.src_ids, batch.tgt_in, batch.targets, src_padding_mask=batch.src_padding_mask)
        return loss
    if isinstance(model, Bert):
        _, loss = model.forward(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                attention_mask=batch["attention_mask"], mlm_labels=batch["labels"],
                                nsp_labels=batch.get("next_sentence_label"))
        return loss
    if isinstance(model, Albert):
        _, loss = model.forward(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                attention_mask=batch["attention_mask"], mlm_labels=batch["labels"],
                                sop_labels=batch.get("sentence_order_label"))
        return loss
    if isinstance(model, ElectraPretraining):  # the generator's samples come from the model's own rng
        _, loss = model.forward(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"])
        return loss
    if isinstance(model, Deberta):
        _, loss = model.forward(batch["input_ids"], attention_mask=batch["attention_mask"], mlm_labels=batch["labels"])
        return loss
    raise TypeError(f"pretraining.forward: argument 'model' expected a model of {tuple(OBJECTIVES)}, "
                    f"got {type(model).__name__}")
