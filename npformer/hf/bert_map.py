"""BERT (``bert``, as ``BertForPreTraining``) and RoBERTa (``roberta``, as ``RobertaForMaskedLM``) <-> npformer's
``Bert``.

Both store nn.Linear weights (out, in), as npformer does; only the names change
(``attention.self.query`` is npformer's ``attention.q_proj``, ...). The encoder's tensors sit
under the inner model's name (``bert.`` / ``roberta.``); BERT's heads under ``cls.*`` with a
pooler, RoBERTa's under ``lm_head.*``. The MLM decoder is the word table itself: a checkpoint may
store it again (``cls.predictions.decoder.weight``, ``lm_head.decoder.weight``), and then it must
equal the table. BERT is written with its NSP head and positions 0 .. T-1, RoBERTa without the
NSP head and with positions counted from the pad id.

Refused by name: another activation than the exact GELU, relative position embeddings, a
decoder or cross attention, an untied decoder.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..models.bert import Bert, BertConfig
from .family import Family, _Fields, _linear_rows, _post_norm_sublayers, _Row

__all__ = ["FAMILY", "bert_config", "bert_rows", "bert_config_json", "bert_layer_pairs", "check_encoder_fields",
           "encoder_sizes", "embedding_rows", "encoder_config_json"]

# The name of each HF model's inner module (the prefix of its encoder's tensors), the prefix of its
# architectures, and the architecture save_pretrained writes (the heads npformer's Bert has).
PREFIX = {"bert": "bert", "roberta": "roberta"}
CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta"}
ARCHITECTURES = {"bert": "BertForPreTraining", "roberta": "RobertaForMaskedLM"}
MLM_HEAD = {"bert": "cls.predictions", "roberta": "lm_head"}


def bert_layer_pairs(hf: str, ours: str) -> List[Tuple[str, str]]:
    """(HF module, npformer module) of one BERT encoder layer (``{pre}.encoder.layer.{i}`` / ``layers.{i}``)."""
    return [(f"{hf}.attention.self.query", f"{ours}.attention.q_proj"),
            (f"{hf}.attention.self.key", f"{ours}.attention.k_proj"),
            (f"{hf}.attention.self.value", f"{ours}.attention.v_proj")] + _post_norm_sublayers(hf, ours)


def check_encoder_fields(f: _Fields, name: str) -> None:
    """Refuse by name what no BERT-style encoder of npformer's (``name``) computes: relative positions, a decoder,
    cross attention, an untied MLM decoder."""
    f.require("position_embedding_type", ("absolute",), "absolute",
              f"npformer's {name} has a learned table of absolute positions")
    f.require("is_decoder", (False,), False, f"npformer's {name} is a bidirectional encoder")
    f.require("add_cross_attention", (False,), False, f"npformer's {name} has no cross attention")
    f.require("tie_word_embeddings", (True,), True, "npformer's MLM head decodes with the word table itself")


def encoder_sizes(f: _Fields, pad_token_id: Optional[int] = 0) -> dict:
    """The fields a BERT-style config.json gives alike, as npformer's config fields (dropout 0: a loaded model
    is for inference and gradients); ``pad_token_id``: the family's default where the field is missing."""
    return dict(vocab_size=f.get("vocab_size", "int"), max_position=f.get("max_position_embeddings", "int"),
                type_vocab_size=f.get("type_vocab_size", "int", 2), n_layer=f.get("num_hidden_layers", "int"),
                n_head=f.get("num_attention_heads", "int"), d_model=f.get("hidden_size", "int"),
                d_ff=f.get("intermediate_size", "int"), dropout=0.0,
                layer_norm_eps=float(f.get("layer_norm_eps", "float", 1e-12)),
                pad_token_id=f.nullable("pad_token_id", "int0", pad_token_id))


def encoder_config_json(cfg, architecture: str, model_type: str) -> dict:
    """config.json's fields a BERT-style encoder writes alike (a family adds its own)."""
    if not cfg.type_vocab_size:
        raise ValueError(f"save_pretrained: argument 'model' has type_vocab_size=0, which {model_type}'s config.json "
                         "cannot express (its models always add a token-type embedding; use type_vocab_size=1)")
    return {"architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.d_ff, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": 0.0, "max_position_embeddings": cfg.max_position,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
            "pad_token_id": cfg.pad_token_id, "position_embedding_type": "absolute", "is_decoder": False,
            "add_cross_attention": False, "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


def embedding_rows(cfg, pre: str) -> List[_Row]:
    """The word, position and (where the config has one) token-type tables of a BERT-style encoder whose
    tensors sit under ``pre``."""
    tables = ("word", "position", "token_type") if cfg.type_vocab_size else ("word", "position")
    return [(f"{pre}.embeddings.{t}_embeddings.weight", (f"embeddings.{t}_embeddings.weight",), "same")
            for t in tables]


def bert_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> BertConfig:
    """config.json -> BertConfig: with the NSP head and positions 0 .. T-1 for bert, without the head and with
    positions counted from the pad id for roberta."""
    model_type = f.get("model_type", "str")
    f.architectures(model_type, CLASS_PREFIX[model_type])
    f.require("hidden_act", ("gelu",), "gelu", "npformer's BERT uses the exact (erf) GELU")
    check_encoder_fields(f, "BERT")
    sizes = encoder_sizes(f, 0 if model_type == "bert" else 1)  # BertConfig's / RobertaConfig's pad id
    if model_type == "roberta" and sizes["pad_token_id"] is None:
        raise f.fail("pad_token_id", "is null; RoBERTa counts its positions from the pad id")
    cfg = BertConfig(**sizes, position_padding_idx=sizes["pad_token_id"] if model_type == "roberta" else None,
                     nsp_head=model_type == "bert", dtype=dtype)
    f.block_size(block_size, cfg.block_size, model_type)
    return cfg


def bert_rows(cfg: BertConfig, variant: Optional[str], model_type: str) -> List[_Row]:
    """The encoder under ``bert.`` / ``roberta.``, then BERT's pooler, MLM and NSP heads or RoBERTa's MLM head."""
    pre, head = PREFIX[model_type], MLM_HEAD[model_type]
    pairs = [(f"{pre}.embeddings.LayerNorm", "embeddings.LayerNorm")]
    for i in range(cfg.n_layer):
        pairs += bert_layer_pairs(f"{pre}.encoder.layer.{i}", f"layers.{i}")
    if model_type == "bert":
        pairs += [("bert.pooler.dense", "pooler.dense"), ("cls.predictions.transform.dense", "mlm_head.dense"),
                  ("cls.predictions.transform.LayerNorm", "mlm_head.layer_norm"),
                  ("cls.seq_relationship", "seq_relationship")]
    else:
        pairs += [("lm_head.dense", "mlm_head.dense"), ("lm_head.layer_norm", "mlm_head.layer_norm")]
    return embedding_rows(cfg, pre) + _linear_rows(pairs) + [(f"{head}.bias", ("mlm_head.bias",), "same")]


def bert_tied(cfg: BertConfig, variant: Optional[str], model_type: str) -> Dict[str, str]:
    """The MLM decoder, stored again: the word table and the head's bias."""
    pre, head = PREFIX[model_type], MLM_HEAD[model_type]
    return {f"{head}.decoder.weight": f"{pre}.embeddings.word_embeddings.weight",
            f"{head}.decoder.bias": f"{head}.bias"}


def bert_ignored(name: str, cfg: BertConfig, model_type: str) -> bool:
    """Buffers some checkpoints carry (position and token-type ids), and RoBERTa's pooler, which the masked-LM
    model has no use for (transformers drops it too)."""
    pre = PREFIX[model_type]
    if name in (f"{pre}.embeddings.position_ids", f"{pre}.embeddings.token_type_ids"):
        return True
    return model_type == "roberta" and name.startswith("roberta.pooler.")


def bert_config_json(cfg: BertConfig, variant: Optional[str], model_type: str) -> dict:
    """config.json of a BertForPreTraining (model_type 'bert') or RobertaForMaskedLM ('roberta')."""
    op = "save_pretrained"
    if model_type == "bert" and (not cfg.nsp_head or cfg.position_padding_idx is not None):
        raise ValueError(f"{op}: argument 'model' expected, for 'bert', the NSP head and positions 0 .. T-1, got "
                         f"nsp_head={cfg.nsp_head}, position_padding_idx={cfg.position_padding_idx}")
    if model_type == "roberta" and (cfg.nsp_head or cfg.position_padding_idx is None
                                    or cfg.position_padding_idx != cfg.pad_token_id):
        raise ValueError(f"{op}: argument 'model' expected, for 'roberta', no NSP head and positions counted from "
                         f"the pad id (position_padding_idx == pad_token_id), got nsp_head={cfg.nsp_head}, "
                         f"position_padding_idx={cfg.position_padding_idx}, pad_token_id={cfg.pad_token_id}")
    return encoder_config_json(cfg, ARCHITECTURES[model_type], model_type)


FAMILY = Family(name="bert", model_types=tuple(PREFIX), models={None: Bert}, config_from_hf=bert_config,
                rows=bert_rows, config_json=bert_config_json,
                infer=lambda model: ("bert" if model.cfg.nsp_head else "roberta", None),
                ignored=bert_ignored, tied=bert_tied)
