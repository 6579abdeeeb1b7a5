"""npformer.experiment and ``npformer experiment``: a tiny study runs and tabulates exactly what its runs
recorded (mean and ddof-1 standard deviation over seeds), resumes after an interruption without running a
finished run again (and gives the same table), refuses a bad study file naming the key, and every built-in
study loads and validates (they are run for the demos, not here)."""

import contextlib
import copy
import csv
import io
import json
import math
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer.experiment as experiment
from npformer.cli import main
from npformer.experiment import StudyError, builtin_studies, load_study, run_study, validate_study
from npformer.models import build

from .tolerances import RTOL

F64 = RTOL[np.dtype(np.float64)]
TEXT = "".join(f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs, {i * 13 % 101} times.\n"
               for i in range(120))
LOSS_COLUMNS = ("val_loss", "train_loss", "perplexity", "val_loss@8", "val_loss@16", "parameters",
                "kv_cache_bytes_per_token", "flops_per_token")  # everything but the timings


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("experiment") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def tiny(corpus_file, **changes):
    """A study of 2 variants x 2 seeds that trains in well under a second per run."""
    study = {"name": "tiny", "family": "variant", "description": "a test study",
             "base": {"n_layer": 1, "n_head": 2, "d_model": 8},
             "variants": {"a": {"norm": "layernorm"}, "b": {"norm": "rmsnorm", "n_kv_head": 1}},
             "seeds": [3, 5],
             "train": {"steps": 4, "batch_size": 2, "block_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup": 1,
                       "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 2, "eval_batches": 2},
             "eval": {"lengths": [8, 16]}, "data": corpus_file, "plot": {"x": "kv_cache_bytes_per_token"}}
    study.update(changes)
    return study


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {row["variant"]: row for row in csv.DictReader(f)}


def table_values(rows, columns=LOSS_COLUMNS):
    return {label: {c: (row[f"{c}_mean"], row[f"{c}_std"]) for c in columns} for label, row in rows.items()}


def metric_of(result, name):
    return result["val_loss_at"][name.split("@")[1]] if "@" in name else result[name]


# -- a study runs and tabulates its runs ----------------------------------------------------------
def test_tiny_study_writes_table_equal_to_its_runs(corpus_file, tmp_path):
    study = validate_study(tiny(corpus_file))
    summary = run_study(study, tmp_path, progress=False, log=lambda *a: None)
    assert (summary["ran"], summary["skipped"]) == (4, 0)
    rows = read_csv(tmp_path / "results.csv")
    assert list(rows) == ["a", "b"]
    for label in ("a", "b"):
        results = [json.loads((tmp_path / "runs" / label / f"seed{s}" / "result.json").read_text()) for s in (3, 5)]
        assert [r["seed"] for r in results] == [3, 5]
        assert [r["steps"] for r in results] == [4, 4]
        # the history counts the updates done: validations after 2 and 4 updates
        assert all(r["history"]["val_steps"] == [2, 4] and r["history"]["steps"] == [1, 2, 3, 4] for r in results)
        assert all(experiment.history_of(r)["val_steps"] == [2, 4] for r in results)
        assert all(r["val_loss"] == r["history"]["val_loss"][-1] for r in results)
        assert all(r["val_loss_at"]["8"] == pytest.approx(r["val_loss"], rel=F64) for r in results)
        assert all(r["perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=F64) for r in results)
        assert rows[label]["seeds"] == "2" and rows[label]["diverged"] == "0"
        for name in experiment.metric_names(study):
            values = [float(metric_of(r, name)) for r in results]
            mean, std = float(rows[label][f"{name}_mean"]), float(rows[label][f"{name}_std"])
            assert mean == pytest.approx(sum(values) / 2, rel=F64, abs=1e-300)
            assert std == pytest.approx(statistics.stdev(values), rel=F64, abs=1e-12)  # ddof = 1
        # the seeds give different initialisations and batches, so the runs differ
        assert results[0]["val_loss"] != results[1]["val_loss"]
    # the KV cache of b (one key/value head of two) is half of a's, as its parameters are fewer
    assert float(rows["b"]["kv_cache_bytes_per_token_mean"]) == float(rows["a"]["kv_cache_bytes_per_token_mean"]) / 2
    assert float(rows["a"]["kv_cache_bytes_per_token_mean"]) == 2 * 1 * 2 * 4 * 4  # 2 L H_kv D_h bytes
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    a = rows["a"]
    assert f"{float(a['val_loss_mean']):.4f} ± {float(a['val_loss_std']):.4f}" in md
    assert md.count("\n| a | variant | 2 | 0 |") == 1 and "a test study" in md
    for name in ("loss_curves.png", "val_loss_vs_kv_cache_bytes_per_token.png", "study.json"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "study.json"
    assert set(summary["files"]) == {"csv", "md", "loss_curves", "plot"}


def test_one_seed_has_no_deviation(corpus_file, tmp_path):
    study = validate_study(tiny(corpus_file, seeds=[0], variants={"only": {}}, plot={"x": "eval_length"}))
    run_study(study, tmp_path, progress=False, log=lambda *a: None)
    row = read_csv(tmp_path / "results.csv")["only"]
    result = json.loads((tmp_path / "runs/only/seed0/result.json").read_text())
    assert row["val_loss_std"] == "-" and float(row["val_loss_mean"]) == result["val_loss"]
    assert f"{result['val_loss']:.4f} ± -" in (tmp_path / "results.md").read_text(encoding="utf-8")
    assert (tmp_path / "val_loss_vs_eval_length.png").is_file()


def test_gpt_and_llama_families_run_side_by_side(corpus_file, tmp_path):
    study = validate_study(tiny(corpus_file, family="gpt", seeds=[0], plot={},
                                variants={"gpt": {}, "llama": {"family": "llama", "n_kv_head": 1}}))
    run_study(study, tmp_path, progress=False, log=lambda *a: None)
    rows = read_csv(tmp_path / "results.csv")
    assert rows["gpt"]["family"] == "gpt" and rows["llama"]["family"] == "llama"
    # GPT caches every head's key and value; this Llama one head's: 2 L H_kv D_h 4 bytes
    assert float(rows["gpt"]["kv_cache_bytes_per_token_mean"]) == 2 * 1 * 8 * 4
    assert float(rows["llama"]["kv_cache_bytes_per_token_mean"]) == 2 * 1 * 1 * 4 * 4
    assert (tmp_path / "val_loss_by_variant.png").is_file()


def test_a_diverging_run_is_recorded_not_fatal(corpus_file, tmp_path):
    study = validate_study(tiny(corpus_file, seeds=[0], variants={"x": {}}))
    real = experiment.eval_loss
    calls = []

    def nan_once(*args):
        calls.append(1)
        return float("nan") if len(calls) == 1 else real(*args)

    experiment.eval_loss = nan_once
    try:
        run_study(study, tmp_path, progress=False, log=lambda *a: None)
    finally:
        experiment.eval_loss = real
    result = json.loads((tmp_path / "runs/x/seed0/result.json").read_text())
    assert result["diverged"] == {"step": 2, "what": "validation loss nan"} and result["steps"] == 2
    assert math.isnan(result["val_loss"])
    row = read_csv(tmp_path / "results.csv")["x"]
    assert row["diverged"] == "1" and row["val_loss_mean"] == "nan"


# -- resuming ----------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def test_interrupted_study_resumes_without_rerunning(corpus_file, tmp_path, monkeypatch):
    study = validate_study(tiny(corpus_file))
    real = experiment.run_one
    ran = []

    def interrupted_after_3(*args, **kwargs):
        if len(ran) == 3:
            raise Interrupt
        ran.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "run_one", interrupted_after_3)
    with pytest.raises(Interrupt):
        run_study(study, tmp_path / "resumed", progress=False, log=lambda *a: None)
    assert ran == [("a", 3), ("a", 5), ("b", 3)]
    done = sorted(p.relative_to(tmp_path / "resumed").as_posix() for p in (tmp_path / "resumed").rglob("result.json"))
    assert done == ["runs/a/seed3/result.json", "runs/a/seed5/result.json", "runs/b/seed3/result.json"]
    stamps = {p: (tmp_path / "resumed" / p).stat().st_mtime_ns for p in done}
    assert not (tmp_path / "resumed" / "results.csv").exists()

    def counted(*args, **kwargs):
        ran.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "run_one", counted)
    logged = []
    summary = run_study(study, tmp_path / "resumed", progress=False, log=logged.append)
    assert ran[3:] == [("b", 5)] and (summary["ran"], summary["skipped"]) == (1, 3)
    assert logged == [f"tiny: 3 of 4 runs already done in {tmp_path / 'resumed'}, 1 to run"]
    assert {p: (tmp_path / "resumed" / p).stat().st_mtime_ns for p in done} == stamps  # not rewritten

    run_study(study, tmp_path / "whole", progress=False, log=lambda *a: None)
    resumed, whole = read_csv(tmp_path / "resumed/results.csv"), read_csv(tmp_path / "whole/results.csv")
    assert table_values(resumed) == table_values(whole)

    again = run_study(study, tmp_path / "resumed", progress=False, log=lambda *a: None)  # all done: nothing runs
    assert (again["ran"], again["skipped"]) == (0, 4) and len(ran) == 4 + 4


def test_result_of_other_settings_is_refused(corpus_file, tmp_path):
    run_study(validate_study(tiny(corpus_file, seeds=[0])), tmp_path, progress=False, log=lambda *a: None)
    changed = tiny(corpus_file, seeds=[0])
    changed["train"] = {**changed["train"], "lr": 5e-3}
    with pytest.raises(StudyError, match=r"runs/a/seed0/result.json was made by other settings"):
        run_study(validate_study(changed), tmp_path, progress=False, log=lambda *a: None)


# -- bad study files ---------------------------------------------------------------------------
def _set(study, path, value):
    *parents, last = path.split(".")
    node = study
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return study


DELETE = object()
BAD = [
    ("colour", "red", "colour"),
    ("name", "a b", "name"),
    ("name", 7, "name"),
    ("family", "bert", "family"),
    ("variants", DELETE, "variants"),
    ("variants", {}, "variants"),
    ("variants", [], "variants"),
    ("variants.a", 3, "variants.a"),
    ("variants.a b", {}, "variants.a b"),
    ("variants.a.family", "t5", "variants.a.family"),
    ("variants.a.norm", "batchnorm", "variants.a.norm"),
    ("variants.a.n_head", 3, "variants.a.n_head"),
    ("variants.a.depth", 3, "variants.a.depth"),
    ("variants.a.vocab_size", 30, "variants.a.vocab_size"),
    ("base.d_model", 0, "base.d_model"),
    ("base.d_model", "8", "base.d_model"),
    ("base.width", 8, "base.width"),
    ("base.vocab_size", 30, "base.vocab_size"),
    ("base.block_size", 12, "base.block_size"),  # shorter than the evaluation length 16
    ("seeds", [], "seeds"),
    ("seeds", [1, 1], "seeds"),
    ("seeds", [1, -2], "seeds.1"),
    ("seeds", [True], "seeds.0"),
    ("seeds", 3, "seeds"),
    ("train", [], "train"),
    ("train.steps", 0, "train.steps"),
    ("train.steps", 2.5, "train.steps"),
    ("train.steps", True, "train.steps"),
    ("train.batch_size", None, "train.batch_size"),
    ("train.warmup", -1, "train.warmup"),
    ("train.warmup", 4, "train.warmup"),  # as long as the run: the peak rate at the last update at best
    ("train.warmup", 9, "train.warmup"),
    ("train.lr", 0, "train.lr"),
    ("train.lr", "fast", "train.lr"),
    ("train.min_lr", 0.5, "train.min_lr"),
    ("train.grad_clip", 0.0, "train.grad_clip"),
    ("train.weight_decay", float("nan"), "train.weight_decay"),
    ("train.eval_batches", 10**6, "train.eval_batches"),
    ("train.momentum", 0.9, "train.momentum"),
    ("eval.lengths", [], "eval.lengths"),
    ("eval.lengths", [8, 8], "eval.lengths"),
    ("eval.lengths", [8, 0], "eval.lengths.1"),
    ("eval.stride", 1, "eval.stride"),
    ("data", "no/such/file.txt", "data"),
    ("plot.x", "colour", "plot.x"),
    ("plot.kind", "bar", "plot.kind"),
    ("description", 5, "description"),
]


@pytest.mark.parametrize("where, value, path", BAD, ids=[f"{w}={v!r:.20}" for w, v, _ in BAD])
def test_bad_study_is_refused_by_key(corpus_file, where, value, path):
    study = _set(copy.deepcopy(tiny(corpus_file)), where, value)
    with pytest.raises(StudyError) as e:
        validate_study(study)
    assert e.value.path == path and str(e.value).startswith(f"{path}: ")


@given(key=st.sampled_from(sorted(experiment.TRAIN_DEFAULTS)),
       value=st.one_of(st.text(max_size=3), st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.floats(max_value=-1e-3), st.just(float("inf"))))
def test_wrong_train_values_name_their_key(key, value):
    study = tiny("default")
    study["train"] = {**study["train"], key: value}
    with pytest.raises(StudyError) as e:
        validate_study(study)
    assert e.value.path == f"train.{key}"


def test_a_result_without_history_steps_counted_from_zero_and_is_read_shifted():
    legacy = {"history": {"steps": [0, 1, 2], "train_loss": [3.0, 2.0, 1.0], "val_steps": [1, 2], "val_loss": [2, 1]}}
    assert experiment.history_of(legacy)["val_steps"] == [2, 3]
    assert experiment.history_of(legacy)["steps"] == [1, 2, 3]
    current = {**legacy, "history_steps": experiment.HISTORY_STEPS}
    assert experiment.history_of(current)["val_steps"] == [1, 2]


@pytest.mark.parametrize("content", [b"", b"caf\xe9 \xff\xfe not utf-8 " * 40])
def test_a_data_file_that_is_empty_or_not_utf8_is_refused_by_name(corpus_file, tmp_path, content):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(StudyError) as e:
        validate_study(tiny(corpus_file, data=str(path)))
    assert e.value.path == "data" and ("UTF-8" in e.value.reason or "empty" in e.value.reason)
    with pytest.raises(StudyError) as e:
        experiment.load_corpus(str(path))
    assert e.value.path == "data"


def test_a_variant_that_breaks_a_valid_base_is_named_not_the_base(corpus_file):
    study = tiny(corpus_file, variants={"a": {"norm": "layernorm"}, "relu": {"d_model": 15}})
    with pytest.raises(StudyError) as e:
        validate_study(study)
    assert e.value.path == "variants.relu.d_model" and "d_model=15" in e.value.reason
    study = tiny(corpus_file, variants={"a": {"norm": "layernorm"}, "two": {"d_model": 15, "n_layer": 2}})
    with pytest.raises(StudyError) as e:
        validate_study(study)
    assert e.value.path == "variants.two"
    bad_base = tiny(corpus_file, base={"n_layer": 1, "n_head": 3, "d_model": 8})
    with pytest.raises(StudyError) as e:
        validate_study(bad_base)
    assert e.value.path.startswith("base.")


def test_a_base_key_another_family_lacks_names_the_variant(corpus_file):
    study = tiny(corpus_file, variants={"a": {"norm": "layernorm"}, "ssm": {"family": "mamba"}})
    with pytest.raises(StudyError) as e:
        validate_study(study)
    assert e.value.path == "variants.ssm"
    assert "base key 'n_head'" in e.value.reason and "mamba" in e.value.reason


def test_study_must_be_an_object():
    for raw in ([], "study", None, 3):
        with pytest.raises(StudyError) as e:
            validate_study(raw)
        assert e.value.path == "study"


# -- the built-in studies ----------------------------------------------------------------------
def test_every_builtin_study_loads_and_validates():
    studies = builtin_studies()
    assert sorted(studies) == ["activation", "blocks", "heads", "mamba", "moe", "norm", "position", "shape"]
    for name, path in studies.items():
        raw = json.loads(path.read_text(encoding="utf-8"))
        study = load_study(name)
        assert study.name == name and study.description and len(study.variants) >= 2
        assert validate_study(raw) == study  # the same study, by name or by content
        for label in study.variants:  # every variant builds (a model of the corpus's 105 characters here)
            assert build(study.families[label], study.model_config(label, 105), seed=0).num_parameters() > 0


def test_builtin_studies_compare_what_they_say():
    norm = load_study("norm")
    assert norm.train["warmup"] == 0 and norm.base["n_layer"] >= 8
    assert {(v["norm"], v["norm_position"]) for v in norm.variants.values()} == \
        {(n, p) for n in ("layernorm", "rmsnorm") for p in ("pre", "post")}

    def params(name):
        s = load_study(name)
        return {label: build(s.families[label], s.model_config(label, 105), seed=0).num_parameters()
                for label in s.variants}

    act = params("activation")
    assert max(act.values()) / min(act.values()) - 1 < 0.01  # equal parameters to within SwiGLU's rounding
    assert len(set(params("shape").values())) == 1  # exactly equal
    pos = load_study("position")
    L = pos.train["block_size"]
    assert pos.lengths == [L, 2 * L, 4 * L] and pos.model_config("rope", 105)["block_size"] == 4 * L
    heads = load_study("heads")
    assert sorted(v["n_kv_head"] for v in heads.variants.values()) == [1, 2, heads.base["n_head"]]
    mamba = params("mamba")
    assert abs(mamba["mamba"] / mamba["gpt"] - 1) < 0.01  # equal parameters to within 1%
    moe = load_study("moe")
    dense = moe.variants["dense"]["intermediate_size"]
    for label, v in moe.variants.items():  # equal active parameters: top-k experts of 1/k the dense width
        assert v.get("num_experts_per_tok", 1) * v["intermediate_size"] == dense if v.get("num_local_experts") \
            else v["intermediate_size"] == dense, label


def test_builtin_studies_are_package_data():
    text = open(experiment.__file__.replace("experiment.py", "../pyproject.toml"), encoding="utf-8").read()
    assert '[tool.setuptools.package-data]' in text and 'npformer = ["studies/*.json"]' in text


# -- the command line --------------------------------------------------------------------------
def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_cli_runs_a_study_file(corpus_file, tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(tiny(corpus_file, seeds=[0])), encoding="utf-8")
    status, out, err = cli("experiment", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert status == 0, err
    rows = read_csv(tmp_path / "out/results.csv")
    assert f"| a | variant | 1 | 0 | {float(rows['a']['val_loss_mean']):.4f} ± - |" in out
    assert "2 runs in" in out and "(0 already done)" in out
    status, out, _ = cli("experiment", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert status == 0 and "0 runs in" in out and "(2 already done)" in out


def test_cli_exit_codes(corpus_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_set(tiny(corpus_file), "train.steps", 0)), encoding="utf-8")
    status, _, err = cli("experiment", str(bad), "--out", str(tmp_path / "x"))
    assert status == 2 and err.startswith("npformer experiment: error: argument study: ")
    assert "train.steps: expected an integer in [1, 1000000], got 0" in err and not (tmp_path / "x").exists()
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    status, _, err = cli("experiment", str(tmp_path / "broken.json"))
    assert status == 2 and "expected a readable JSON file" in err
    status, _, err = cli("experiment", "no_such_study")
    assert status == 2 and "expected a built-in study (activation, blocks, heads, mamba, moe, norm, position, shape)" in err
    status, _, err = cli("experiment")
    assert status == 2 and "argument study" in err
    status, _, err = cli("experiment", "norm", "--bogus")
    assert status == 2 and "unrecognized arguments: --bogus" in err
    status, out, _ = cli("experiment", "--list")
    assert status == 0 and [line.split(":")[0] for line in out.splitlines()] == sorted(builtin_studies())
    # a result left by other settings: a failure while working, exit status 1
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tiny(corpus_file, seeds=[0], variants={"a": {}})), encoding="utf-8")
    assert cli("experiment", str(good), "--out", str(tmp_path / "y"), "--no-progress")[0] == 0
    good.write_text(json.dumps(tiny(corpus_file, seeds=[0], variants={"a": {"norm": "rmsnorm"}})), encoding="utf-8")
    status, _, err = cli("experiment", str(good), "--out", str(tmp_path / "y"), "--no-progress")
    assert status == 1 and "was made by other settings" in err
    status, out, _ = cli("experiment", "--help")
    assert status == 0 and "--out" in out
