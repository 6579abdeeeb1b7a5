"""The command line as a newcomer meets it: every bad option value ends in one line naming the option,
exit status 2, before any work (nothing is written); unknown flags print the subcommand's usage;
every flag's help says what it does and its default."""

import contextlib
import io
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import npformer.train as train_module
from npformer import checkpoint, gradcheck
from npformer.cli import build_parser, main
from npformer.train import TrainConfig, train

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
_names = itertools.count()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A folder with a text file and a finished tiny run (runs/tiny/ckpt.npz)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (root / "one.txt").write_text("x", encoding="utf-8")
    train(TrainConfig(data=str(root / "corpus.txt"), n_layer=1, n_head=2, d_model=16, block_size=16, batch_size=4,
                      steps=4, warmup=1, eval_interval=4, eval_batches=1, sample_tokens=0,
                      out_dir=str(root / "runs" / "tiny"), progress=False), log=lambda *a: None)
    return root


@contextlib.contextmanager
def inside(folder):
    """Run with ``folder`` as the working directory (contextlib.chdir needs Python 3.11)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def run(home, argv):
    """``npformer argv`` in-process, inside ``home``: (status, stdout, stderr, files created or removed)."""
    before = set(home.rglob("*"))
    out, err = io.StringIO(), io.StringIO()
    with inside(home), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue(), set(home.rglob("*")) ^ before


def assert_one_line_error(status, err, changed, command, option):
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert re.match(rf"npformer {command}: error: argument {re.escape(option)}: \S", lines[0]), lines[0]
    assert not changed, f"files written or removed: {sorted(map(str, changed))}"


# -- generated bad values, as the strings a user types --------------------------------------------------
NOT_NUMBERS = st.sampled_from(["x", "", "1,5", "one", "--"])
NOT_INTS = NOT_NUMBERS | st.sampled_from(["1.5", "1e3", "0x10", "True", "2.0"])


def ints_below(lo):
    return st.integers(max_value=lo - 1).map(str) | NOT_INTS


def floats_outside(lo=None, hi=None, lo_open=False, hi_open=False):
    """Strings of floats outside the interval (NaN and the infinities never inside), or not numbers."""
    outside = st.sampled_from(["nan", "inf", "-inf"])
    if lo is not None:
        outside |= st.floats(max_value=lo, exclude_max=not lo_open, allow_infinity=False).map(repr)
    if hi is not None:
        outside |= st.floats(min_value=hi, exclude_min=not hi_open, allow_infinity=False).map(repr)
    return outside | NOT_NUMBERS


def not_choices(choices):
    return st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8).filter(
        lambda s: s not in choices)


def missing_file():
    return st.text("abcdefghij_", min_size=1, max_size=8).map(lambda s: f"missing/{s}.txt")


TRAIN_BAD = {
    "--steps": ints_below(1), "--batch-size": ints_below(1), "--eval-interval": ints_below(1),
    "--eval-batches": ints_below(1) | st.integers(1001, 10**20).map(str),
    "--n-layer": ints_below(1) | st.sampled_from(["100000000", "10000000000"]),  # memory: named, not --d-model
    "--d-model": ints_below(1),
    "--block-size": ints_below(1) | st.integers(900, 10**6).map(str),  # longer than the data's splits
    "--n-head": ints_below(1) | st.sampled_from(["3", "5", "6", "7", "32"]),  # not dividing d_model = 16
    "--warmup": ints_below(0), "--sample-tokens": ints_below(0) | st.integers(10_001, 10**20).map(str),
    "--seed": ints_below(0), "--stop-at": ints_below(0) | st.integers(3, 10**6).map(str),  # beyond --steps 2
    "--lr": floats_outside(lo=0.0, lo_open=True), "--min-lr": floats_outside(lo=0.0, hi=0.01),
    "--dropout": floats_outside(lo=0.0, hi=1.0, hi_open=True),
    "--val-fraction": floats_outside(lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    "--weight-decay": floats_outside(lo=0.0), "--grad-clip": floats_outside(lo=0.0, lo_open=True),
    "--dtype": not_choices({"float32", "float64"}) | st.sampled_from(["float16", "bfloat16"]),
    "--precision": not_choices({"float32", "bfloat16", "float16"}) | st.sampled_from(["fp16", "bf16", "float64"]),
    "--checkpoint-format": not_choices({"npz", "safetensors"}) | st.just("pt"),
    "--data": missing_file() | st.sampled_from(["runs", "/dev/null", "one.txt"]),
    "--config": missing_file() | st.sampled_from(["runs", "/dev/null"]),
    "--out-dir": st.sampled_from(["corpus.txt", "corpus.txt/sub", "one.txt/a/b", "/proc/nope"]),  # cannot be made
    "--model": not_choices({"gpt", "llama", "bert", "roberta", "deberta", "albert", "electra", "t5", "bart",
                            "transformer"})
    | st.sampled_from(["GPT", "gpt2", "BERT"]),
    "--objective": st.sampled_from(["mlm", "nsp", "sop", "rtd", "x"]),  # none of them is the default gpt's
    "--n-kv-head": ints_below(0) | st.sampled_from(["1", "2"]),  # the default model, gpt, has no kv heads apart
    "--hf": missing_file() | st.sampled_from(["runs", "corpus.txt", "/dev/null"]),  # no config.json there
    "--save-hf": st.sampled_from(["corpus.txt", "corpus.txt/sub", "/proc/nope"]),  # cannot be made
    "--gradflow-every": ints_below(0),
}


def train_args(name):
    return ["train", "--data", "corpus.txt", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "16",
            "--batch-size", "2", "--steps", "2", "--lr", "0.01", "--eval-interval", "2", "--sample-tokens", "0",
            "--out-dir", f"runs/new{name}", "--no-progress"]


@pytest.mark.parametrize("option", sorted(TRAIN_BAD))
@given(data=st.data())
def test_train_rejects_a_bad_value_naming_the_option(home, option, data):
    value = data.draw(TRAIN_BAD[option], label="value")
    status, _, err, changed = run(home, train_args(next(_names)) + [f"{option}={value}"])
    assert_one_line_error(status, err, changed, "train", option)


def test_every_train_option_has_generated_bad_values():
    parser = build_parser()[1]["train"]
    valued = {a.option_strings[0] for a in parser._actions if a.option_strings and a.nargs != 0}
    assert valued - {"-h"} == set(TRAIN_BAD)


CONFIG_BAD = st.sampled_from([
    ("{not json", "JSON"), ("[1, 2]", "JSON object"), ('{"stepz": 3}', "stepz"), ('{"steps": 0}', "'steps'"),
    ('{"n_head": 5}', "'n_head'"), ('{"dtype": "float16"}', "'dtype'"), ('{"lr": "fast"}', "'lr'"),
    ('{"checkpoint_format": "pt"}', "'checkpoint_format'"), ('{"eval_interval": 0}', "'eval_interval'")])


@given(CONFIG_BAD)
def test_a_bad_config_file_is_named_with_the_field(home, case):
    text, named = case
    path = home / f"cfg{next(_names)}.json"
    path.write_text(text)
    argv = ["train", "--data", "corpus.txt", "--out-dir", f"runs/new{next(_names)}", "--config", path.name]
    status, _, err, changed = run(home, argv)
    assert_one_line_error(status, err, changed, "train", "--config")
    assert named in err


@given(st.sampled_from(["runs/none", "runs/elsewhere/deeper", "nothing"]), st.booleans())
def test_resume_without_a_run_says_so_and_creates_nothing(home, out_dir, give_format):
    argv = ["train", "--resume", "--out-dir", out_dir] + (["--checkpoint-format", "npz"] if give_format else [])
    status, _, err, changed = run(home, argv)
    assert_one_line_error(status, err, changed, "train", "--resume")
    assert "no " in err and not (home / out_dir).exists()


def test_resume_of_a_finished_run_says_how_to_extend_it(home):
    status, out, err, changed = run(home, ["train", "--resume", "--out-dir", "runs/tiny"])
    assert status == 0 and not changed and err == ""
    assert "finished run (4 of 4 steps)" in out and "--steps 8" in out


@given(st.integers(1, 8))
def test_a_saved_run_is_not_overwritten_without_the_flag(home, steps):
    argv = ["train", "--data", "corpus.txt", "--steps", str(steps), "--out-dir", "runs/tiny"]
    status, _, err, changed = run(home, argv)
    assert_one_line_error(status, err, changed, "train", "--out-dir")
    assert "--overwrite" in err


@given(st.sampled_from(["--block-size", "--batch-size", "--d-model"]))
def test_a_run_larger_than_memory_is_refused_with_the_estimate(home, option):
    big = {"--block-size": ["--block-size", "170", "--batch-size", "128"],
           "--batch-size": ["--block-size", "16", "--batch-size", "100000", "--d-model", "64"],
           "--d-model": ["--d-model", "4096", "--n-head", "2", "--n-layer", "8"]}[option]
    argv = train_args(next(_names)) + big
    available = train_module.available_memory
    train_module.available_memory = lambda: 64 << 20  # 64 MiB
    try:
        status, _, err, changed = run(home, argv)
    finally:
        train_module.available_memory = available
    assert_one_line_error(status, err, changed, "train", option)
    assert "needs about" in err and "64.0 MiB is available" in err


SAMPLE_BAD = {
    "--tokens": ints_below(0) | st.integers(100_001, 10**30).map(str), "--top-k": ints_below(1),
    "--seed": ints_below(0),
    "--temperature": floats_outside(lo=0.0), "--top-p": floats_outside(lo=0.0, hi=1.0),
    "--checkpoint": missing_file() | st.sampled_from(["runs", "corpus.txt", "runs/tiny/loss.png", "/dev/null"]),
    "--prompt": st.text(st.characters(min_codepoint=0x100, max_codepoint=0x2FF), min_size=1, max_size=4) | st.just(""),
    "--hf": missing_file() | st.sampled_from(["runs", "corpus.txt", "/dev/null"]),  # and not with --checkpoint
}


@pytest.mark.parametrize("option", sorted(SAMPLE_BAD))
@given(data=st.data())
def test_sample_rejects_a_bad_value_naming_the_option(home, option, data):
    value = data.draw(SAMPLE_BAD[option], label="value")
    argv = ["sample", "--checkpoint", "runs/tiny/ckpt.npz", "--tokens", "2", f"{option}={value}"]
    status, out, err, changed = run(home, argv)
    assert_one_line_error(status, err, changed, "sample", option)
    assert out == ""


def test_sample_without_a_run_says_so_and_creates_nothing(tmp_path):
    status, _, err, changed = run(tmp_path, ["sample"])
    assert_one_line_error(status, err, changed, "sample", "--checkpoint")
    assert "there is no runs/gpt;" in err and list(tmp_path.iterdir()) == []


def test_sample_continues_the_prompt(home):
    status, out, _, changed = run(home, ["sample", "--checkpoint", "runs/tiny/ckpt.npz", "--prompt", "the",
                                                 "--tokens", "5", "--top-p", "0", "--temperature", "0.5"])
    assert status == 0 and out.startswith("the") and len(out.rstrip("\n")) == 8 and not changed


BENCH_BAD = {
    "--steps": ints_below(1), "--batch": ints_below(1), "--d-model": ints_below(1),
    "--vocab-size": ints_below(1), "--block-size": ints_below(1) | st.integers(50_000, 10**6).map(str),
    "--n-layer": ints_below(1) | st.sampled_from(["100000000", "10000000000"]),
    "--n-head": ints_below(1) | st.sampled_from(["5", "7", "500"]),  # not dividing d_model = 384
    "--dtype": not_choices({"float32", "float64"}),
    # inference options: without --inference each is named as belonging to it
    "--prompt-len": ints_below(1) | st.just("64"), "--new-tokens": ints_below(1) | st.just("8"),
    "--repeats": ints_below(1) | st.just("2"), "--hf": missing_file() | st.just("runs"),
    "--model": not_choices({"gpt", "llama"}) | st.just("llama"), "--attn": not_choices({"eager", "sdpa"}) | st.just("sdpa"),
}


@pytest.mark.parametrize("option", sorted(BENCH_BAD))
@given(data=st.data())
def test_bench_rejects_a_bad_value_naming_the_option(home, option, data):
    value = data.draw(BENCH_BAD[option], label="value")
    status, out, err, changed = run(home, ["bench", "--no-torch", f"{option}={value}"])
    assert_one_line_error(status, err, changed, "bench", option)
    assert out == ""  # refused before timing anything


GRADCHECK_BAD = {"--eps": floats_outside(lo=0.0, lo_open=True), "--tol": floats_outside(lo=0.0, lo_open=True),
                 "--seed": ints_below(0)}


@pytest.mark.parametrize("option", sorted(GRADCHECK_BAD))
@given(data=st.data())
def test_gradcheck_rejects_a_bad_value_naming_the_option(home, option, data):
    value = data.draw(GRADCHECK_BAD[option], label="value")
    status, out, err, changed = run(home, ["gradcheck", "layernorm", f"{option}={value}"])
    assert_one_line_error(status, err, changed, "gradcheck", option)
    assert out == ""


FAMILIES = gradcheck.families()


@given(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(lambda s: s not in FAMILIES + ["all"]))
def test_gradcheck_names_an_unknown_family(home, family):
    status, out, err, changed = run(home, ["gradcheck", "layernorm", family])
    assert_one_line_error(status, err, changed, "gradcheck", "FAMILY")
    assert repr(family) in err


@given(st.sampled_from(["train", "sample", "bench"]),
       st.text("abcdefghijklmnopqrstuvwxyz-", min_size=2, max_size=12).map(lambda s: "--x" + s))
def test_an_unknown_flag_prints_the_subcommands_usage(home, command, bogus):
    status, _, err, changed = run(home, [command, bogus])
    assert status == 2 and not changed
    assert err.startswith(f"usage: npformer {command} ")
    assert err.strip().splitlines()[-1] == f"npformer {command}: error: unrecognized arguments: {bogus}"


def subparsers():
    parser, subs = build_parser()
    return subs


@pytest.mark.parametrize("command", ["train", "sample", "bench"])
def test_every_flag_says_what_it_does_and_its_default(command, capsys):
    parser = subparsers()[command]
    options = [a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert options
    for action in options:
        assert action.help and len(action.help) > 20, action.option_strings
        assert re.search(r"\(default: [^)]+\)$", action.help), (action.option_strings, action.help)
    assert main([command, "--help"]) == 0
    shown = re.sub(r"\s+", " ", capsys.readouterr().out)
    for action in options:
        assert action.option_strings[0] in shown
    assert shown.count("(default: ") == len(options)


def test_train_help_states_the_real_defaults():
    actions = {a.dest: a for a in subparsers()["train"]._actions}
    for name, f in TrainConfig.__dataclass_fields__.items():
        assert actions[name].help.endswith(f"(default: {f.default!r})"), name


def test_gradcheck_help_lists_the_op_families(capsys):
    assert main(["gradcheck", "--help"]) == 0
    shown = re.sub(r"\s+", " ", capsys.readouterr().out)
    families = gradcheck.families()
    assert len(families) > 5 and all(f in shown for f in families)
    assert "usage: npformer gradcheck" in shown and "(default: 1e-06)" in shown


def test_module_entry_point_exits_with_the_status(home):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "npformer", "train", "--steps", "0"], cwd=home,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "npformer train: error: argument --steps: expected an integer >= 1, got 0"


# -- no abbreviations -----------------------------------------------------------------------------------
# With each abbreviated flag goes a bad value of a real flag: a parser that took the abbreviation would
# stop on that value (naming it) instead of at the abbreviation.
STOPPERS = {"train": ["--steps", "0"], "sample": ["--tokens", "-1"], "bench": ["--steps", "0"], "finetune": ["--steps", "0"],
            "gradcheck": ["layernorm", "--seed", "-1"], "translate": ["--steps", "0"],
            "experiment": ["no_such_study"]}


def long_options(command):
    if command == "gradcheck":
        return ["--eps", "--tol", "--seed"]
    parser = subparsers()[command]
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


@given(st.sampled_from(sorted(STOPPERS)), st.data())
def test_an_abbreviated_flag_is_unknown(home, command, data):
    options = long_options(command)
    option = data.draw(st.sampled_from(options), label="option")
    prefix = option[:data.draw(st.integers(3, len(option) - 1), label="length")]
    assume(prefix not in options)
    status, _, err, changed = run(home, [command, f"{prefix}=x"] + STOPPERS[command])
    assert status == 2 and not changed
    assert err.strip().splitlines()[-1].endswith(f"error: unrecognized arguments: {prefix}=x"), err


# -- resume: the run named now, the data it was trained on --------------------------------------------------
TINY_RUN = ["--n-layer", "1", "--n-head", "2", "--d-model", "8", "--block-size", "8", "--batch-size", "2",
            "--eval-batches", "1", "--sample-tokens", "0", "--no-progress"]


@given(default_dir=st.booleans(), absolute_data=st.booleans())
def test_resume_continues_the_run_in_the_out_dir_named_now(tmp_path_factory, default_dir, absolute_data):
    root = tmp_path_factory.mktemp("copied")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    data = str(root / "corpus.txt") if absolute_data else "corpus.txt"
    assert run(root, ["train", "--data", data, "--steps", "4", "--out-dir", "runs/original"] + TINY_RUN)[0] == 0
    copy = root / "runs" / ("gpt" if default_dir else "copy")
    shutil.copytree(root / "runs" / "original", copy)
    before = {p.name: p.read_bytes() for p in (root / "runs" / "original").iterdir()}
    argv = ["train", "--resume", "--steps", "6"] + ([] if default_dir else ["--out-dir", str(copy.relative_to(root))])
    status, out, err, _ = run(root, argv)
    assert status == 0, err
    assert {p.name: p.read_bytes() for p in (root / "runs" / "original").iterdir()} == before  # untouched
    assert checkpoint.load(copy / "ckpt.npz")["step"] == 6 and f"checkpoint {copy.relative_to(root)}/ckpt.npz" in out


@given(st.sampled_from(["moved", "edited"]))
def test_a_data_path_from_the_checkpoint_is_named_as_such(tmp_path_factory, change):
    root = tmp_path_factory.mktemp("datapath")
    (root / "texts").mkdir()
    (root / "texts" / "corpus.txt").write_text(TEXT, encoding="utf-8")
    argv = ["train", "--data", "texts/corpus.txt", "--steps", "2", "--out-dir", "runs/r"] + TINY_RUN
    assert run(root, argv)[0] == 0
    if change == "moved":
        (root / "texts" / "corpus.txt").rename(root / "texts" / "elsewhere.txt")
    else:
        (root / "texts" / "corpus.txt").write_text(TEXT.upper(), encoding="utf-8")
    status, _, err, changed = run(root, ["train", "--resume", "--out-dir", "runs/r", "--steps", "4"])
    assert_one_line_error(status, err, changed, "train", "--data")
    assert "runs/r/ckpt.npz" in err and "'texts/corpus.txt'" in err
    if change == "moved":
        assert "not given" in err and "saved in" in err and "current folder" in err and "does not exist" in err
    else:
        assert "--data was not given" in err and "saved in" in err


def test_resume_with_overwrite_names_the_conflict_first(tmp_path):
    status, _, err, changed = run(tmp_path, ["train", "--resume", "--overwrite"])
    assert_one_line_error(status, err, changed, "train", "--overwrite")
    assert "--resume" in err


def test_a_finished_run_with_other_data_names_the_data(home):
    (home / "other.txt").write_text(TEXT.upper(), encoding="utf-8")
    status, out, err, changed = run(home, ["train", "--resume", "--out-dir", "runs/tiny", "--data", "other.txt"])
    assert_one_line_error(status, err, changed - {home / "other.txt"}, "train", "--data")
    assert "finished" not in out


# -- files that are not regular files, data too short, both formats ------------------------------------------
@given(st.sampled_from(["--data", "--config"]), st.sampled_from(["/dev/null", "fifo"]))
def test_a_device_or_a_pipe_is_named_for_what_it_is(tmp_path_factory, option, kind):
    root = tmp_path_factory.mktemp("special")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    path = kind
    if kind == "fifo":
        os.mkfifo(root / "fifo")
    argv = ["train", "--data", "corpus.txt", "--out-dir", "runs/x", option, path]
    status, _, err, _ = run(root, argv)
    assert status == 2 and f"argument {option}:" in err
    assert ("a character device, not a regular file" if kind == "/dev/null" else "a pipe, not a regular file") in err
    assert "no such file" not in err and not (root / "runs").exists()


def test_a_one_character_text_is_named(home):
    status, _, err, changed = run(home, ["train", "--data", "one.txt", "--out-dir", "runs/one"])
    assert_one_line_error(status, err, changed, "train", "--data")
    assert "at least 2 characters" in err


def test_a_text_too_short_for_any_block_says_the_data_is_too_short(home):
    (home / "three.txt").write_text("abc", encoding="utf-8")
    status, _, err, changed = run(home, ["train", "--data", "three.txt", "--out-dir", "runs/three",
                                         "--block-size", "1"])
    assert_one_line_error(status, err, changed - {home / "three.txt"}, "train", "--data")
    assert "too short for any --block-size" in err


@given(st.sampled_from(["sample", "train"]))
def test_a_folder_with_both_formats_is_refused_naming_both(tmp_path_factory, home, command):
    root = tmp_path_factory.mktemp("both")
    shutil.copytree(home / "runs" / "tiny", root / "runs" / "gpt")
    checkpoint.save(root / "runs" / "gpt" / "ckpt.safetensors", checkpoint.load(root / "runs" / "gpt" / "ckpt.npz"))
    argv = ["sample", "--tokens", "2"] if command == "sample" else ["train", "--resume"]
    status, _, err, changed = run(root, argv)
    assert_one_line_error(status, err, changed, command, "--checkpoint" if command == "sample" else "--resume")
    assert "runs/gpt/ckpt.npz" in err and "runs/gpt/ckpt.safetensors" in err


# -- sample: a folder, the default prompt, non-finite models -------------------------------------------------------
def test_sample_accepts_the_run_folder(home):
    argv = ["sample", "--prompt", "the", "--tokens", "6", "--seed", "2"]
    by_file = run(home, argv + ["--checkpoint", "runs/tiny/ckpt.npz"])
    by_folder = run(home, argv + ["--checkpoint", "runs/tiny"])
    assert by_file[0] == by_folder[0] == 0 and by_file[1] == by_folder[1] and by_file[1].startswith("the")


@given(st.text("abcdefgh ", min_size=1, max_size=3).map(lambda s: s * 400))
def test_the_default_prompt_works_without_a_newline_in_the_text(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("nonewline")
    (root / "flat.txt").write_text(text, encoding="utf-8")
    assert run(root, ["train", "--data", "flat.txt", "--steps", "1", "--out-dir", "runs/gpt"] + TINY_RUN)[0] == 0
    status, out, err, _ = run(root, ["sample", "--tokens", "4"])
    assert status == 0 and err == "" and out.startswith(text[0]) and len(out.rstrip("\n")) == 5


def test_sample_refuses_non_finite_weights(tmp_path_factory, home):
    root = tmp_path_factory.mktemp("nanweights")
    state = checkpoint.load(home / "runs" / "tiny" / "ckpt.npz")
    state["model"]["ln_f.weight"][0] = float("nan")
    checkpoint.save(root / "bad" / "ckpt.npz", state)
    status, out, err, changed = run(root, ["sample", "--checkpoint", "bad"])
    assert_one_line_error(status, err, changed, "sample", "--checkpoint")
    assert "finite" in err and "ln_f.weight" in err and out == ""


def test_sample_stops_on_logits_it_cannot_sample(home, monkeypatch):
    from npformer.models.gpt import GPT

    real = GPT.forward

    def nan_logits(self, *args, **kwargs):
        logits, rest = real(self, *args, **kwargs)
        return logits * float("nan"), rest

    monkeypatch.setattr(GPT, "forward", nan_logits)
    status, out, err, changed = run(home, ["sample", "--checkpoint", "runs/tiny", "--tokens", "5"])
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and not changed and out == ""
    assert lines[0].startswith("npformer sample: error: runs/tiny/ckpt.npz: generate: the model's logits for new "
                               "token 0 hold ")


# -- memory: the option that drives it ------------------------------------------------------------------------
@given(st.sampled_from(["train", "bench"]), st.integers(10**7, 10**10))
def test_a_very_deep_model_names_n_layer(home, command, layers):
    argv = (train_args(next(_names)) if command == "train" else ["bench", "--no-torch"]) + ["--n-layer", str(layers)]
    status, _, err, changed = run(home, argv)
    assert_one_line_error(status, err, changed, command, "--n-layer")
    assert "needs about" in err
