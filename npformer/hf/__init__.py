"""Hugging Face folders in and out: safetensors, config and tensor-name maps, bf16 decoding.

NumPy only: the safetensors format is read and written in NumPy (``npformer/_safetensors.py``, shared with
the training checkpoints; ``safetensors.py`` adds bf16/fp16 decoding and sharded folders), and the
config fields and tensor names of each model family are mapped by explicit tables: one ``Family``
record per family in its ``*_map.py`` (gpt2, llama/mistral/qwen2, bert/roberta, albert, electra,
deberta-v2), kept in ``pretrained.REGISTRY``; ``load_pretrained``, ``save_pretrained`` and
``hf_state_dict`` are generic over it.
"""

from .pretrained import (REGISTRY, HFFormatError, check_savable, hf_state_dict, load_pretrained, read_generation_config,
                         save_pretrained)
from .safetensors import SafetensorsError, read_safetensors, write_safetensors

__all__ = ["HFFormatError", "SafetensorsError", "load_pretrained", "save_pretrained", "read_generation_config",
           "hf_state_dict", "check_savable", "REGISTRY", "read_safetensors", "write_safetensors"]

try:  # the tokenizer module is optional: the weights load without it
    from .tokenizer import HFTokenizer, load_tokenizer  # noqa: F401
except ModuleNotFoundError as err:
    if err.name != f"{__name__}.tokenizer":  # a missing dependency inside it is an error to see
        raise
else:
    __all__ += ["HFTokenizer", "load_tokenizer"]
