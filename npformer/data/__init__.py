"""Tokenizers, the built-in corpus, batching, and synthetic arithmetic tasks.

- ``char.py``: ``CharTokenizer`` (one id per character);
- ``bpe.py``: ``ByteBPE`` (byte-level BPE: train, encode, decode, save, load);
- ``corpus.py``: ``default_corpus`` (prose from the standard library), ``train_val_split``, ``get_batch``;
- ``arithmetic.py``: addition / subtraction / multiplication problems as text, a held-out
  split, answer-only loss masks, ``exact_match``.
"""

from .arithmetic import IGNORE_INDEX, ArithmeticTask, Problem, exact_match, make_batch
from .bpe import ByteBPE
from .char import CharTokenizer
from .corpus import default_corpus, get_batch, train_val_split

__all__ = ["CharTokenizer", "ByteBPE", "default_corpus", "train_val_split", "get_batch",
           "ArithmeticTask", "Problem", "make_batch", "exact_match", "IGNORE_INDEX"]
