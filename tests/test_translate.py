"""``npformer translate``: a small encoder-decoder learns the numbers task (Transformer and T5) far above
chance, beam search and greedy are both scored by exact match and BLEU, a seeded run repeats exactly,
every option is refused by name, and the subcommand prints its table."""

from __future__ import annotations

import math
import re
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.cli import build_parser, main
import npformer.translate as translate_module
from npformer.data.translation import (BOS_ID, CHARS, EOS_ID, PAD_ID, TranslationVocab, number_to_words,
                                       translation_task)
from npformer.metrics import corpus_bleu
from npformer.translate import (FAMILY_DEFAULTS, FAMILY_FIELDS, TranslateConfig, TranslateError,
                                STRAY, build_translation_model, decoded_text, results_table, score_translations,
                                target_tokens, translate)
from tests.badinput import expect_rejected

try:  # one BLAS thread: on a small shared machine, the tiny matrices here run several times faster so
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

QUIET = lambda *a: None  # noqa: E731
# A small model on a small split, scored once at the end.
SMALL_RUN = dict(task="numbers", train_size=2000, valid_size=50, test_size=100, dropout=0.0, batch_size=32,
                 eval_interval=1000, num_beams=3, progress=False)
# Each family's shape, steps and rate, and a bar well below the exact match measured with them (seed 0, one
# BLAS thread): transformer 0.50 greedy, 0.51 beam; t5 0.36 greedy, 0.42 beam (test split). The Transformer
# needs two layers of width 64 to leave, within a few hundred steps, the plateau where it predicts the
# digits' marginal (loss about ln 10); label smoothing delays it. It leaves it near step 400, so its bar
# keeps a wide margin.
LEARNS = {"transformer": (dict(n_layer=2, d_model=64, d_ff=64, batch_size=16, steps=500, lr=2e-3, warmup=100,
                               label_smoothing=0.0), 0.3),
          "t5": (dict(n_layer=1, d_model=32, d_ff=64, steps=800, lr=5e-3, warmup=100), 0.25)}
# Chance: 1 / 10 for a one-digit number, and far less for a longer one.
CHANCE = 0.1


@pytest.fixture(autouse=True)
def one_thread():
    if threadpool_limits is None:  # pragma: no cover
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def comparable(summary):
    """A summary without the trained model and the wall times (which differ between two equal runs)."""
    return {k: v for k, v in summary.items() if k not in ("model", "seconds", "decode_seconds")}


# -- learning -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(LEARNS))
def test_a_small_model_learns_the_numbers_task_far_above_chance(family):
    options, bar = LEARNS[family]
    logged = []
    summary = translate(TranslateConfig(model=family, **{**SMALL_RUN, **options}), log=logged.append)
    assert summary["family"] == family and summary["steps"] == options["steps"]
    assert summary["greedy"]["exact_match"] > bar > CHANCE, summary["greedy"]
    assert summary["beam"]["exact_match"] > bar, summary["beam"]
    for name in ("greedy", "beam"):
        scores = summary[name]
        assert set(scores) == {"exact_match", "bleu", "bleu_order"} and scores["bleu_order"] == 4
        assert 0.0 <= scores["bleu"] <= 1.0 and scores["bleu"] > bar - 0.1
    gain = summary["gain"]
    assert gain["exact_match"] == summary["beam"]["exact_match"] - summary["greedy"]["exact_match"]
    assert gain["bleu"] == summary["beam"]["bleu"] - summary["greedy"]["bleu"]
    history = summary["history"]
    assert history["train_loss"][-1] < history["train_loss"][0] / 2
    assert history["val_steps"] == [options["steps"]]  # eval_interval beyond the run: the end only
    # the examples are test pairs and their decodings, the scores those of the decodings
    test = translation_task("numbers", sizes=(2000, 50, 100)).test
    assert len(summary["examples"]) == 5
    for example, pair in zip(summary["examples"], test):
        assert (example["source"], example["target"]) == (pair.source, pair.target)
    assert logged[0].startswith(f"translate numbers (forward) with {family}: ")
    assert any(line.startswith(f"step {options['steps']}: train loss ") for line in logged)


def test_a_seeded_run_repeats_exactly_and_another_seed_differs():
    cfg = {**SMALL_RUN, "model": "transformer", "n_layer": 1, "d_model": 16, "d_ff": 16, "train_size": 64, "test_size": 8, "valid_size": 8, "steps": 6,
           "eval_interval": 3, "dropout": 0.1}
    first = translate(TranslateConfig(**cfg), log=QUIET)
    again = translate(TranslateConfig(**cfg), log=QUIET)
    other = translate(TranslateConfig(**cfg, seed=1), log=QUIET)
    assert comparable(first) == comparable(again)
    assert first["history"]["train_loss"] != other["history"]["train_loss"]
    assert first["history"]["val_steps"] == [3, 6] and len(first["history"]["train_loss"]) == 6


@pytest.mark.parametrize("family, task, reverse", [("bart", "numbers", False), ("t5", "dates", True),
                                                   ("transformer", "dates", False)])
def test_every_family_and_task_runs_end_to_end(family, task, reverse):
    cfg = TranslateConfig(model=family, task=task, reverse=reverse, train_size=16, valid_size=4, test_size=6,
                          n_layer=1, n_head=2, d_model=8, d_ff=8, steps=2, batch_size=4, eval_interval=1,
                          num_beams=2, max_new_tokens=5)
    summary = translate(cfg, log=QUIET)
    assert summary["config"]["schedule"] == FAMILY_DEFAULTS[family]["schedule"]
    assert summary["max_new_tokens"] == 5 and summary["history"]["val_steps"] == [1, 2]
    model = summary["model"]
    assert (model.cfg.pad_token_id, model.cfg.eos_token_id, model.cfg.decoder_start_token_id) == (PAD_ID, EOS_ID,
                                                                                                   BOS_ID)
    for example in summary["examples"]:  # at most max_new_tokens characters, EOS not among them
        assert len(example["greedy"]) <= 5 and len(example["beam"]) <= 5
    # dates forward: three-word targets, so BLEU counts up to trigrams; reversed: characters, order 4
    order = 4 if (task == "numbers" or reverse) else 3
    assert summary["greedy"]["bleu_order"] == order == summary["beam"]["bleu_order"]


def test_the_default_max_new_tokens_is_the_longest_target_and_a_margin():
    cfg = TranslateConfig(train_size=8, valid_size=2, test_size=2, n_layer=1, n_head=2, d_model=8, d_ff=8, steps=1,
                          batch_size=8, num_beams=1)
    summary = translate(cfg, log=QUIET)
    task = translation_task("numbers", sizes=(8, 2, 2))
    longest = max(len(p.target) for p in task.train + task.validation + task.test)
    assert summary["max_new_tokens"] == longest + 1 + 4


# -- scores ---------------------------------------------------------------------------------------------
def test_target_tokens_are_characters_for_digits_and_words_otherwise():
    assert target_tokens("342") == ("3", "4", "2")
    assert target_tokens("2024-03-07") == tuple("2024-03-07")
    assert target_tokens("7 March 2024") == ("7", "March", "2024")
    assert target_tokens("three hundred and forty-two") == ("three", "hundred", "and", "forty-two")
    assert target_tokens("forty-two") == ("forty-two",)
    assert target_tokens("34 2", characters=True) == ("3", "4", " ", "2")  # split as its reference "342" is
    assert target_tokens("7 March", characters=False) == ("7", "March") and target_tokens("") == ()


@given(st.lists(st.integers(0, 999_999), min_size=1, max_size=8), st.data())
def test_scores_are_exact_match_and_corpus_bleu_of_the_tokens(numbers, data):
    references = [str(n) for n in numbers]
    predictions = [data.draw(st.sampled_from([r, r[:-1], r + "0", r[::-1], r + " 1", "seven"]))
                   for r in references]
    scores = score_translations(predictions, references)
    assert scores["exact_match"] == np.mean([p == r for p, r in zip(predictions, references)])
    order = min(4, max(map(len, references)))
    expected = corpus_bleu([[tuple(r)] for r in references], [tuple(p) for p in predictions], max_order=order)
    assert scores["bleu_order"] == order and math.isclose(scores["bleu"], expected, rel_tol=0, abs_tol=0)
    perfect = score_translations(references, references)
    assert perfect["exact_match"] == 1.0 and perfect["bleu"] == 1.0


@given(st.lists(st.integers(0, 999_999), min_size=1, max_size=8), st.data())
def test_word_targets_are_scored_over_their_words(numbers, data):
    references = [number_to_words(n) for n in numbers]
    predictions = [data.draw(st.sampled_from([r, r.rsplit(" ", 1)[0], r + " and one", str(len(r))]))
                   for r in references]
    scores = score_translations(predictions, references)
    words = [tuple(r.split(" ")) for r in references]
    order = min(4, max(map(len, words)))
    expected = corpus_bleu([[w] for w in words], [tuple(p.split(" ")) for p in predictions], max_order=order)
    assert scores["bleu_order"] == order and scores["bleu"] == expected
    assert scores["exact_match"] == np.mean([p == r for p, r in zip(predictions, references)])


def test_results_table_shows_greedy_beam_and_gain():
    summary = {"greedy": {"exact_match": 0.5, "bleu": 0.25, "bleu_order": 4},
               "beam": {"exact_match": 0.75, "bleu": 0.5, "bleu_order": 4},
               "gain": {"exact_match": 0.25, "bleu": 0.25}, "config": {"num_beams": 4, "test_size": 10}}
    lines = results_table(summary).splitlines()
    assert lines[0].split() == ["test", "(10", "pairs)", "exact", "match", "BLEU-4"]
    assert lines[1].split() == ["greedy", "0.5000", "0.2500"]
    assert lines[2].split() == ["beam", "search", "(4)", "0.7500", "0.5000"]
    assert lines[3].split() == ["beam", "-", "greedy", "+0.2500", "+0.2500"]


# -- the model's ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["transformer", "t5", "bart"])
def test_each_family_is_built_on_the_vocabulary_s_ids(family):
    cfg = TranslateConfig(model=family, n_layer=1, n_head=2, d_model=8, d_ff=12).validate()
    model = build_translation_model(cfg, 50, 20)
    c = model.cfg
    assert (c.vocab_size, c.pad_token_id, c.eos_token_id, c.decoder_start_token_id) == (50, PAD_ID, EOS_ID, BOS_ID)
    assert c.d_model == 8 and c.d_ff == 12 and c.dropout == 0.0


@given(text=st.text(alphabet=CHARS, max_size=12), tail=st.lists(st.integers(0, 49), max_size=4))
def test_decoded_text_reads_characters_up_to_eos_as_the_vocabulary_does(text, tail):
    vocab = TranslationVocab()
    ids = vocab.encode(text) + [EOS_ID] + tail
    assert decoded_text(ids) == text == vocab.decode(ids)
    assert decoded_text(np.asarray(ids, dtype=np.int64)) == text


def test_a_stray_pad_or_bos_is_no_match_and_marks_its_bleu_tokens():
    vocab = TranslationVocab()
    row = [BOS_ID, PAD_ID, BOS_ID, *vocab.encode("342"), EOS_ID, PAD_ID]
    assert vocab.decode(row) == "342"  # the vocabulary skips them; the scores must not
    assert decoded_text(row) == STRAY * 3 + "342"
    assert decoded_text([*vocab.encode("34"), 50, EOS_ID]) == "34" + STRAY  # an id past the vocabulary
    scores = score_translations([decoded_text(row), "7"], ["342", "7"])
    assert scores["exact_match"] == 0.5
    assert STRAY in target_tokens(decoded_text(row), True)
    clean = score_translations(["342", "7"], ["342", "7"])
    assert clean["exact_match"] == 1.0 and scores["bleu"] < clean["bleu"]
    assert all(STRAY not in c for c in CHARS)


def test_the_decoded_splits_are_scored_with_their_stray_tokens(monkeypatch):
    task = translation_task("numbers", sizes=(2, 2, 2))
    vocab = task.vocab

    def stray_greedy(model, src_ids, **options):  # a decoding with PAD and BOS before the target
        rows = [[BOS_ID, BOS_ID, PAD_ID, *vocab.encode(p.target), EOS_ID] for p in task.test]
        width = max(map(len, rows))
        return np.asarray([r + [PAD_ID] * (width - len(r)) for r in rows], dtype=np.int64)

    monkeypatch.setattr(translate_module, "greedy", stray_greedy)
    decoded = translate_module._decode_split(None, task, "test", vocab, 20, 0, 1.0)
    assert decoded == [STRAY * 2 + p.target for p in task.test]
    assert score_translations(decoded, [p.target for p in task.test])["exact_match"] == 0.0


def test_a_warmup_longer_than_the_run_is_refused_and_the_default_is_shortened():
    with pytest.raises(TranslateError) as info:
        TranslateConfig(steps=10, warmup=11).validate()
    assert info.value.field == "warmup" and "expected at most steps = 10" in str(info.value)
    assert TranslateConfig(steps=10, warmup=10).validate().warmup == 10  # the peak at the last update
    for family in FAMILY_DEFAULTS:
        assert TranslateConfig(model=family, steps=5).validate().warmup == 5
        assert TranslateConfig(model=family, steps=500).validate().warmup == FAMILY_DEFAULTS[family]["warmup"]
    assert main(["translate", "--steps", "10", "--warmup", "20"]) == 2


# -- bad options ----------------------------------------------------------------------------------------
BAD = [("model", "gpt"), ("model", 3), ("task", "poems"), ("reverse", 1), ("reverse", "yes"),
       ("train_size", 0), ("valid_size", 0), ("test_size", -1), ("train_size", 2.5),
       ("n_layer", 0), ("n_head", 5), ("n_head", 0), ("d_model", 1), ("d_ff", 0), ("dropout", 1.0),
       ("dropout", -0.1), ("steps", 0), ("steps", True), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")),
       ("warmup", 0), ("warmup", 1.5), ("warmup", 2001), ("schedule", "step"), ("label_smoothing", 1.0), ("label_smoothing", -0.1),
       ("weight_decay", -0.1), ("grad_clip", -1.0), ("grad_clip", float("inf")), ("seed", -1),
       ("eval_interval", 0), ("num_beams", 0), ("length_penalty", float("nan")), ("length_penalty", "1"),
       ("max_new_tokens", 0), ("max_new_tokens", 10 ** 6), ("dtype", "float16"), ("progress", None)]


@pytest.mark.parametrize("name, value", BAD)
def test_a_bad_option_is_named(name, value):
    with pytest.raises(TranslateError) as info:
        translate(TranslateConfig(**{name: value}), log=QUIET)
    assert info.value.field == name and f"translate: argument '{name}' expected" in str(info.value)


def test_every_field_has_a_bad_value_above():
    assert {name for name, _ in BAD} == {f.name for f in fields(TranslateConfig)}


@pytest.mark.parametrize("name", ["train_size", "valid_size", "test_size"])
def test_a_split_size_past_what_the_task_holds_is_named(name):
    with pytest.raises(TranslateError) as info:
        translate(TranslateConfig(task="dates", **{name: 100_000}), log=QUIET)
    assert info.value.field == name and "expected at most the " in str(info.value)


def test_choices_that_conflict_are_named():
    for cfg, name in ((TranslateConfig(model="t5", label_smoothing=0.1), "label_smoothing"),
                      (TranslateConfig(model="transformer", d_model=9, n_head=3), "d_model"),
                      (TranslateConfig(d_model=30, n_head=4), "n_head")):
        with pytest.raises(TranslateError) as info:
            translate(cfg, log=QUIET)
        assert info.value.field == name
    expect_rejected(lambda: translate({"model": "t5"}, log=QUIET), "translate", "cfg")


@pytest.mark.parametrize("family", ["transformer", "t5", "bart"])
def test_the_family_defaults_fill_what_is_left_at_none(family):
    cfg = TranslateConfig(model=family).validate()
    for name in FAMILY_FIELDS:
        expected = FAMILY_DEFAULTS[family].get(name)
        assert getattr(cfg, name) == expected, name
    given = TranslateConfig(model=family, lr=1e-4, warmup=7, schedule="cosine").validate()
    assert (given.lr, given.warmup, given.schedule) == (1e-4, 7, "cosine")


# -- the subcommand -------------------------------------------------------------------------------------------
TINY_FLAGS = ["--train-size", "32", "--valid-size", "4", "--test-size", "6", "--n-layer", "1", "--n-head", "2",
              "--d-model", "8", "--d-ff", "8", "--steps", "3", "--batch-size", "8", "--eval-interval", "2",
              "--num-beams", "2", "--no-progress"]


def test_the_subcommand_prints_its_table_and_returns_0(capsys):
    assert main(["translate", "--model", "t5", "--task", "dates", *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    assert out.startswith("translate dates (forward) with t5: ")
    assert len(re.findall(r"^step \d+: train loss \d", out, flags=re.M)) == 2  # steps 2 and 3
    table = out[out.rindex("test (6 pairs)"):].splitlines()
    assert re.fullmatch(r"test \(6 pairs\)\s+exact match\s+BLEU-3", table[0]), table
    assert re.fullmatch(r"greedy\s+\d\.\d{4}\s+\d\.\d{4}", table[1]), table
    assert re.fullmatch(r"beam search \(2\)\s+\d\.\d{4}\s+\d\.\d{4}", table[2]), table
    assert re.fullmatch(r"beam - greedy\s+[+-]\d\.\d{4}\s+[+-]\d\.\d{4}", table[3]), table
    assert table[4].startswith("trained in ")


@pytest.mark.parametrize("argv, named", [
    (["--steps", "0"], "--steps"), (["--lr", "-1"], "--lr"), (["--task", "poems"], "--task"),
    (["--model", "gpt"], "--model"), (["--d-model", "10", "--n-head", "4"], "--n-head"),
    (["--model", "t5", "--label-smoothing", "0.1"], "--label-smoothing"), (["--num-beams", "0"], "--num-beams"),
    (["--task", "dates", "--test-size", "100000"], "--test-size"), (["--dtype", "float16"], "--dtype"),
    (["--max-new-tokens", "x"], "--max-new-tokens"), (["--schedule", "linear"], "--schedule")])
def test_a_bad_flag_returns_2_and_names_it_in_one_line(argv, named, capsys):
    assert main(["translate", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"npformer translate: error: argument {named}"), lines


def test_an_abbreviated_flag_is_unknown(capsys):
    assert main(["translate", "--ste", "3", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: unrecognized arguments: --ste 3")


def test_every_translate_flag_says_what_it_does_and_its_default(capsys):
    parser = build_parser()[1]["translate"]
    options = [a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert len(options) == len(fields(TranslateConfig))
    for action in options:
        default = TranslateConfig.__dataclass_fields__[action.dest].default
        shown = "the model's" if default is None else repr(default)
        assert action.help.endswith(f"(default: {shown})"), action.option_strings
        assert len(action.help) > 20
    assert main(["translate", "--help"]) == 0
    shown = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert all(a.option_strings[0] in shown for a in options)
    assert "translate" in build_parser()[0].format_help()
