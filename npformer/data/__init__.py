"""Tokenizers, the built-in corpus, batching, and synthetic arithmetic tasks.

- ``char.py``: ``CharTokenizer`` (one id per character);
- ``bpe.py``: ``ByteBPE`` (byte-level BPE: train, encode, decode, save, load);
- ``corpus.py``: ``default_corpus`` (prose from the standard library), ``train_val_split``, ``get_batch``;
- ``arithmetic.py``: addition / subtraction / multiplication problems as text, a held-out
  split, answer-only loss masks, ``exact_match``;
- ``vocab.py``: checks shared by the tokenizers, ``check_vocab`` (a tokenizer against a
  model's ``vocab_size``), ``tokenizer_difference`` / ``check_same_tokenizer`` (against a
  saved one); ``corpus.data_fingerprint`` identifies a text or token stream;
- ``objectives.py``: encoder pre-training objectives: masked LM (80/10/10, whole-word option),
  NSP and SOP sentence pairs, ELECTRA's replaced-token labels, and corpus batches for each;
- ``wordpiece.py``: a WordPiece trainer (the default corpus), ``vocab.txt`` / ``tokenizer.json`` writers, and
  ``load_vocab_txt`` (encodes as Hugging Face's BERT tokenizer);
- ``tasks.py``: fine-tuning tasks from the standard library (docstring -> module, Python token
  tags), split by hash, ``classification_batches``, accuracy / macro-F1 / majority baseline /
  confusion matrix;
- ``seq2seq_objectives.py``: encoder-decoder pre-training: T5 span corruption with sentinels,
  BART text infilling and sentence permutation, and corpus batches for each (``seq2seq_batches``);
- ``translation.py``: built-in translation tasks (number words <-> digits, dates between formats),
  split by hash, a character vocabulary, ``translation_batches``.
"""

from .arithmetic import IGNORE_INDEX, ArithmeticTask, Problem, exact_match, make_batch
from .bpe import ByteBPE
from .char import CharTokenizer
from .corpus import data_fingerprint, default_corpus, get_batch, train_val_split
from .seq2seq_objectives import Seq2SeqBatch, Seq2SeqSpecials, seq2seq_batches, seq2seq_specials_for
from .translation import TRANSLATION_TASKS, TranslationVocab, translation_batches, translation_task
from .objectives import (PairBatch, SpecialIds, mask_tokens, pretraining_batches, replaced_token_labels,
                         sentence_pairs, special_ids_for)
from .tasks import (Task, TaggedLine, TextExample, accuracy, align_labels, classification_batches, confusion_matrix,
                    docstring_task, load_task, macro_f1, majority_baseline, token_accuracy, token_task)
from .vocab import check_same_tokenizer, check_vocab, tokenizer_difference
from .wordpiece import load_vocab_txt, train_wordpiece

__all__ = ["CharTokenizer", "ByteBPE", "default_corpus", "train_val_split", "get_batch",
           "ArithmeticTask", "Problem", "make_batch", "exact_match", "IGNORE_INDEX",
           "check_vocab", "check_same_tokenizer", "tokenizer_difference", "data_fingerprint",
           "mask_tokens", "sentence_pairs", "replaced_token_labels", "pretraining_batches", "special_ids_for",
           "SpecialIds", "PairBatch", "Task", "TaggedLine", "TextExample", "accuracy", "align_labels",
           "classification_batches", "confusion_matrix", "docstring_task", "load_task", "macro_f1",
           "majority_baseline", "token_accuracy", "token_task", "train_wordpiece", "load_vocab_txt",
           "Seq2SeqBatch", "Seq2SeqSpecials", "seq2seq_batches", "seq2seq_specials_for", "TRANSLATION_TASKS",
           "TranslationVocab", "translation_batches", "translation_task"]
