"""Pre-training encoders with the trainer: which objectives each family takes, its config, its batches, its loss.

``npformer train --model bert --objective mlm`` runs the same loop as a GPT run (AdamW,
schedule, clipping, checkpoints, resume); what differs is gathered here:

- the objectives a family trains with (``OBJECTIVES``; the first is its default): masked LM
  ("mlm"), whole-word masked LM ("wwm"), next-sentence prediction with MLM ("nsp");
- the model's config from the run's options and the tokenizer: the character vocabulary
  plus four special ids after it ([CLS], [SEP], [MASK], [PAD], ``special_ids_for``);
- batches of ``npformer.data.objectives.pretraining_batches`` over the run's training (or
  validation) text, ``block_size`` tokens each, drawn from the run's data generator (so a
  resumed run draws what the uninterrupted one would);
- one training forward of a batch, returning the loss (the model keeps its caches for
  ``backward()``).
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np

from .data.objectives import SpecialIds, pretraining_batches, special_ids_for
from .models.albert import Albert, AlbertConfig
from .models.bert import Bert, BertConfig
from .models.deberta import Deberta, DebertaConfig
from .models.electra import ElectraConfig, ElectraPretraining, ElectraPretrainingConfig

# family -> the objectives it trains with, its default first. ALBERT's sentence-order prediction (SOP) and
# ELECTRA's replaced-token detection (RTD) each add to a masked LM; "rtd" batches are masked-LM batches.
OBJECTIVES: Dict[str, tuple] = {"bert": ("mlm", "wwm", "nsp"), "roberta": ("mlm", "wwm"), "deberta": ("mlm", "wwm"),
                                "albert": ("sop", "mlm", "wwm"), "electra": ("rtd",)}
ENCODERS = tuple(OBJECTIVES)


def specials_for(tokenizer) -> SpecialIds:
    return special_ids_for(tokenizer)


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


def batches(tokenizer, objective: str, text: str, *, batch_size: int, block_size: int, specials: SpecialIds,
            rng: np.random.Generator) -> Iterator[Dict[str, np.ndarray]]:
    """Endless batches of ``block_size`` tokens of ``text`` for ``objective``, drawn from ``rng``."""
    return pretraining_batches(tokenizer, "mlm" if objective == "rtd" else objective, rng=rng, batch_size=batch_size,
                               max_length=block_size, specials=specials, text=text)


def forward(model, batch: Dict[str, np.ndarray]) -> float:
    """The loss of one batch: masked LM, plus the sentence-pair loss when the batch has its labels."""
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
    raise TypeError(f"pretraining.forward: argument 'model' expected an encoder of {ENCODERS}, "
                    f"got {type(model).__name__}")
