"""The model families by name, for the trainer, the sampler and the benchmark.

``FAMILIES`` maps a family's name (``npformer train --model NAME``) to its model and
config classes (RoBERTa is a configuration of BERT's model); ``family_of(model)`` is the
inverse (the first family of the model's class). ``CAUSAL_LMS`` are those that generate,
``ENCODER_DECODERS`` those that decode a target from a source (``npformer.decoding``).
Each family's file imports no other.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

from .albert import Albert, AlbertConfig
from .bart import Bart, BartConfig
from .bert import Bert, BertConfig
from .deberta import Deberta, DebertaConfig
from .electra import ElectraPretraining, ElectraPretrainingConfig
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .mamba import MambaConfig, MambaLM
from .t5 import T5, T5Config
from .transformer import Transformer, TransformerConfig
from .variant import VariantConfig, VariantLM

FAMILIES: Dict[str, Tuple[Type, Type]] = {"gpt": (GPT, GPTConfig), "llama": (Llama, LlamaConfig),
                                          "bert": (Bert, BertConfig), "roberta": (Bert, BertConfig),
                                          "deberta": (Deberta, DebertaConfig), "albert": (Albert, AlbertConfig),
                                          "electra": (ElectraPretraining, ElectraPretrainingConfig),
                                          "t5": (T5, T5Config), "transformer": (Transformer, TransformerConfig),
                                          "bart": (Bart, BartConfig), "variant": (VariantLM, VariantConfig),
                                          "mamba": (MambaLM, MambaConfig)}
CAUSAL_LMS = ("gpt", "llama", "variant", "mamba")  # predict the next token (generate, sample, bench --inference)
ENCODER_DECODERS = ("t5", "bart", "transformer")  # the families that encode a source and decode a target


def family(name: str) -> Tuple[Type, Type]:
    """(model class, config class) of the family ``name``; ``ValueError`` naming the families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"family: argument 'name' expected one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def family_of(model: object) -> str:
    """The family name of a model instance (``TypeError`` for anything else)."""
    for name, (cls, _) in FAMILIES.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"family_of: argument 'model' expected one of {', '.join(c.__name__ for c, _ in FAMILIES.values())}, "
                    f"got {type(model).__name__}")


def check_causal_lm(op: str, name: str, model: object) -> None:
    """A model that ``generate`` and the language-model trainer can drive (GPT or Llama); ``ValueError``
    naming ``name`` for an encoder (BERT, ...), which predicts masked tokens, not the next one."""
    if not isinstance(model, tuple(FAMILIES[f][0] for f in CAUSAL_LMS)):
        what = ("an encoder-decoder, which writes a target for a source (npformer.decoding)"
                if isinstance(model, tuple(FAMILIES[f][0] for f in ENCODER_DECODERS)) else
                "which predicts masked tokens, not the next one")
        raise ValueError(f"{op}: argument '{name}' expected a causal language model ({', '.join(CAUSAL_LMS)}), "
                         f"got a {type(model).__name__}, {what}")


def build(name: str, config: dict, seed: int = 0):
    """A new model of family ``name`` from its config's fields (``to_dict()``), initialised with ``seed``."""
    model_cls, config_cls = family(name)
    return model_cls(config_cls(**config), seed=seed)
