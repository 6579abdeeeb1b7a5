"""Fine-tuning: each encoder's ``encode``/``backward_encode`` (the body alone), the wrapper's gradient against a
torch composition (BERT, RoBERTa, ELECTRA twins) or central differences (ALBERT, DeBERTa), ``finetune`` on the five
families, beating the majority baseline, checkpoints in and out, bad options, and the ``finetune`` subcommand."""

import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.bert import TwinBert
from kernels.twins.electra import TwinElectraDiscriminator
from npformer.cli import build_parser, main
from npformer.finetune import (
    PRETRAINING_HEADS,
    FinetuneConfig,
    FinetuneError,
    FinetuneModel,
    finetune,
)
from npformer.models.albert import Albert, AlbertConfig
from npformer.models.bert import Bert, BertConfig
from npformer.models.deberta import Deberta, DebertaConfig
from npformer.models.electra import ElectraConfig, ElectraPretraining
from npformer.nn.heads import IGNORE_INDEX, SequenceClassificationHead, TokenClassificationHead
from npformer.train import TrainConfig, train
from tests.badinput import expect_rejected
from tests.tolerances import FD_EPS, FD_RTOL, MODEL_RTOL, assert_close

try:  # one BLAS thread: on a small shared machine, the tiny matrices here run several times faster so
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

QUIET = lambda *a: None  # noqa: E731
SHAPE = dict(vocab_size=11, n_layer=2, n_head=2, d_model=6, d_ff=7, dropout=0.0)


def one_thread():
    return threadpool_limits(1, user_api="blas") if threadpool_limits else _nothing()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def randomise(model, seed=7):
    """Weights of order one (not the near-uniform init), so every mask, bias and norm shows in the loss."""
    rng = np.random.default_rng(seed)
    for name, prm in model.named_parameters():
        base = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
        scale = 0.3 if prm.data.ndim == 1 else 1.0 / np.sqrt(prm.shape[1])
        prm.data[...] = base + scale * rng.standard_normal(prm.shape)
    return model


def encoders(family, dtype="float64", seed=0, **overrides):
    """A tiny randomised model of ``family`` (the whole pre-training model)."""
    shape = {**SHAPE, **overrides, "dtype": dtype}
    if family == "bert":
        return randomise(Bert(BertConfig(**shape, max_position=9), seed=seed))
    if family == "roberta":
        return randomise(Bert(BertConfig(**shape, max_position=12, type_vocab_size=1, pad_token_id=1,
                                         position_padding_idx=1, nsp_head=False), seed=seed))
    if family == "albert":
        return randomise(Albert(AlbertConfig(**{**shape, "n_layer": 3}, max_position=9, embedding_size=4), seed=seed))
    if family == "deberta":
        return randomise(Deberta(DebertaConfig(**shape, max_position=9, position_buckets=4,
                                               max_relative_positions=6), seed=seed))
    if family == "electra":
        cfg = ElectraConfig(**shape, max_position=9, embedding_size=4)
        return randomise(ElectraPretraining(ElectraConfig(**{**shape, "d_model": 4, "n_head": 1}, max_position=9,
                                                          embedding_size=4), cfg, seed=seed))
    raise ValueError(family)


FAMILIES = ("bert", "roberta", "albert", "deberta", "electra")


def inputs(model, B=3, T=7, seed=1):
    """ids, an attention mask with right padding in the later rows (each keeps a token)."""
    rng = np.random.default_rng(seed)
    cfg = model.discriminator.cfg if hasattr(model, "discriminator") else model.cfg
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    for b in range(1, B):
        mask[b, rng.integers(1, T + 1):] = 0
    if cfg.pad_token_id is not None:
        ids[mask == 0] = cfg.pad_token_id
    return ids, mask


# -- encode: the body the pre-training forward runs ------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_is_the_body_the_forward_runs(family):
    """The pre-training head applied to encode's hidden states gives forward's logits exactly."""
    model = encoders(family).eval()
    ids, mask = inputs(model)
    if family == "electra":
        disc = model.discriminator
        hidden = model.encode(ids, None, mask)
        want = disc.forward(ids, None, mask)[0].rtd_logits
        got = disc.discriminator_predictions.forward(hidden)
    else:
        hidden = model.encode(ids, None, mask)
        want = model.forward(ids, None, mask)[0].mlm_logits
        got = model.mlm_head.forward(hidden, model.embeddings.word_embeddings.weight.data)
    assert hidden.shape == ids.shape + (model.cfg.d_model if family != "electra" else 6,)
    np.testing.assert_array_equal(got, want)
    assert all(m._caches == [] for _, m in model.named_modules())  # eval mode: no cache anywhere


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_encode_matches_encode_last_in_first_out(family):
    """Two encodes, then two backward_encodes: the gradients of both calls add up, each dhidden checked."""
    model = encoders(family)
    rng = np.random.default_rng(2)
    calls = [inputs(model, seed=s) for s in (1, 2)]
    douts, alone = [], []
    for ids, mask in calls:
        model.zero_grad()
        h = model.encode(ids, None, mask)
        douts.append(rng.standard_normal(h.shape))
        model.backward_encode(douts[-1])
        alone.append({n: p.grad.copy() for n, p in model.named_parameters()})
    model.zero_grad()
    for ids, mask in calls:
        model.encode(ids, None, mask)
    bad = douts[0][:, :-1] if douts[0].shape != douts[1].shape else douts[1][..., :-1]
    expect_rejected(lambda: model.backward_encode(bad), "backward_encode", "dhidden")
    model.backward_encode(douts[1])
    model.backward_encode(douts[0])
    for name, p in model.named_parameters():
        assert_close(p.grad, alone[0][name] + alone[1][name], what=name)
    with pytest.raises(RuntimeError):
        model.backward_encode(douts[0])


@pytest.mark.parametrize("family", ["bert", "albert", "deberta"])
def test_backward_encode_refuses_a_pending_forward(family):
    model = encoders(family)
    ids, mask = inputs(model)
    model.encode(ids, None, mask)
    h_shape = ids.shape + (model.cfg.d_model,)
    model.forward(ids, None, mask, mlm_labels=np.where(mask == 1, ids, IGNORE_INDEX))
    with pytest.raises(RuntimeError, match="not encode"):
        model.backward_encode(np.zeros(h_shape))
    model.backward()  # the forward's own backward still works, then the encode's
    model.backward_encode(np.zeros(h_shape))
    assert all(m._caches == [] for _, m in model.named_modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_checks_its_inputs_by_name(family):
    model = encoders(family)
    ids, mask = inputs(model)
    expect_rejected(lambda: model.encode(ids.astype(np.float64)), "encode", "ids")
    expect_rejected(lambda: model.encode(ids, None, mask[:, :-1]), "encode", "attention_mask")
    assert all(m._caches == [] for _, m in model.named_modules())


# -- the wrapper's gradient against torch --------------------------------------------------------------
def wrapper(model, kind, K, seed=3):
    body = model.discriminator if hasattr(model, "discriminator") else model
    cls = SequenceClassificationHead if kind == "sequence" else TokenClassificationHead
    head = randomise(cls(body.cfg.d_model, K, dropout=0.0, rng=np.random.default_rng(seed), dtype=np.float64),
                     seed)
    for name in PRETRAINING_HEADS:
        if name in body._modules:
            setattr(body, name, None)
    return FinetuneModel(body, head)


def torch_head(kind, head, h):
    params = {n: torch.tensor(p.data, requires_grad=True) for n, p in head.named_parameters()}
    x = torch.tanh(F.linear(h[:, 0], params["pooler.dense.weight"], params["pooler.dense.bias"])) \
        if kind == "sequence" else h
    return F.linear(x, params["classifier.weight"], params["classifier.bias"]), params


def labels_for(kind, mask, K, rng):
    if kind == "sequence":
        return rng.integers(0, K, mask.shape[0])
    labels = rng.integers(0, K, mask.shape)
    labels[(mask == 0) | (rng.random(mask.shape) < 0.3)] = IGNORE_INDEX
    labels[0, 0] = 0
    return labels


@settings(max_examples=8, deadline=None)
@given(family=st.sampled_from(["bert", "roberta", "electra"]), kind=st.sampled_from(["sequence", "token"]),
       K=st.sampled_from([1, 3, 5]), T=st.sampled_from([1, 4, 7]), seed=st.integers(0, 2**16))
def test_wrapper_gradient_equals_a_torch_composition_of_the_twin(family, kind, K, T, seed):
    """Encoder body + head, end to end, in float64: the twin's embeddings and layers, then the head in torch."""
    model = encoders(family, seed=seed % 5)
    ids, mask = inputs(model, T=T, seed=seed)
    rng = np.random.default_rng(seed)
    labels = labels_for(kind, mask, K, rng)
    net = wrapper(model, kind, K, seed)
    _, loss = net.forward(ids, mask, labels)
    net.zero_grad()
    net.backward()

    body = net.encoder
    if family == "electra":
        twin = TwinElectraDiscriminator(**body.cfg.to_dict()).double()
        state = dict(body.state_dict())
        twin_names = dict(twin.named_parameters())
        twin.load_npformer_state({n: state[n] if n in state else twin_names[n].detach().numpy() for n in twin_names})
        h = twin.encode(torch.from_numpy(ids), None, torch.from_numpy(mask), None)
    else:
        twin = TwinBert(**{**body.cfg.to_dict(), "nsp_head": False}).double()
        own = dict(twin.named_parameters())
        with torch.no_grad():
            for name, p in body.named_parameters():
                own[name].copy_(torch.from_numpy(p.data))
        pad = torch.from_numpy(mask == 0)
        h = twin.embeddings(torch.from_numpy(ids), None, None, None)
        for layer in twin.layers:
            h = layer(h, pad, None, "")
    logits, head_params = torch_head(kind, net.head, h)
    want = F.cross_entropy(logits.reshape(-1, K), torch.from_numpy(labels).reshape(-1), ignore_index=IGNORE_INDEX)
    want.backward()
    assert_close(loss, want.item(), rtol=MODEL_RTOL, scale=max(abs(want.item()), 1.0), what="loss")
    expected = {f"head.{n}": p.grad.numpy() for n, p in head_params.items()}
    expected.update({f"encoder.{n}": np.zeros(p.shape) if p.grad is None else p.grad.numpy()
                     for n, p in twin.named_parameters()})
    for name, p in net.named_parameters():
        # a key bias is softmax-invariant: its gradient is 0 up to rounding, measured on the value bias's scale
        scale = np.abs(expected[name.replace("k_proj", "v_proj")]).max() if "k_proj.bias" in name else None
        assert_close(p.grad, expected[name], rtol=MODEL_RTOL, scale=scale, what=name)


@pytest.mark.parametrize("family", ["albert", "deberta", "bert"])
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_wrapper_gradient_equals_central_differences(family, kind):
    """Independent of torch: every parameter's gradient at sampled entries, against (L(w + e) - L(w - e)) / 2e."""
    model = encoders(family, seed=1)
    ids, mask = inputs(model, B=2, T=5, seed=4)
    K = 3
    labels = labels_for(kind, mask, K, np.random.default_rng(4))
    net = wrapper(model, kind, K)
    net.forward(ids, mask, labels)
    net.zero_grad()
    net.backward()
    net.eval()
    rng = np.random.default_rng(0)
    checked = 0
    for name, p in net.named_parameters():
        flat, grad = p.data.reshape(-1), p.grad.reshape(-1)
        for i in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            keep = flat[i]
            flat[i] = keep + FD_EPS
            up = net.forward(ids, mask, labels)[1]
            flat[i] = keep - FD_EPS
            down = net.forward(ids, mask, labels)[1]
            flat[i] = keep
            numeric = (up - down) / (2 * FD_EPS)
            assert abs(grad[i] - numeric) <= FD_RTOL * max(1.0, abs(numeric)), (name, i, grad[i], numeric)
            checked += 1
    assert checked > 20


# -- finetune: runs on every family, learns, beats the majority baseline ----------------------------------
TINY_RUN = dict(n_layer=1, n_head=2, d_model=16, dropout=0.0, batch_size=16, block_size=24, lr=3e-3, warmup=2,
                weight_decay=0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_runs_on_every_family_and_its_validation_loss_falls(family):
    with one_thread():
        summary = finetune(FinetuneConfig(task="tokens", model=family, steps=16, eval_interval=8, **TINY_RUN),
                           log=QUIET)
    history = summary["history"]
    assert history["val_steps"] == [0, 8, 16] and len(history["train_loss"]) == 16
    assert history["val_loss"][-1] < history["val_loss"][0] - 0.05, history["val_loss"]
    assert np.isfinite(history["train_loss"]).all()
    net = summary["model"]
    assert not any(n.split(".")[1] in PRETRAINING_HEADS for n, _ in net.named_parameters() if n.startswith("encoder"))
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0 and summary["test"]["scored"] > 0


def test_small_bert_beats_the_majority_baseline_on_both_tasks():
    """Measured on a shared 2-core machine with one BLAS thread: 15 to 21 s for both tasks."""
    runs = {"docstrings": dict(steps=200, eval_interval=200), "tokens": dict(steps=100, eval_interval=100)}
    start = time.perf_counter()
    lines = []
    with one_thread():
        for task, options in runs.items():
            summary = finetune(FinetuneConfig(task=task, model="bert", n_layer=1, n_head=4, d_model=32, dropout=0.1,
                                              batch_size=32, block_size=64, lr=3e-3, warmup=20, seed=1, **options),
                               log=lines.append)
            test = summary["test"]
            assert test["accuracy"] > test["majority_baseline"] + 0.05, (task, test)
            assert test["macro_f1"] > 1.0 / summary["model"].head.num_labels * 0.5, (task, test)
            assert lines[-1] == f"test accuracy {test['accuracy']:.4f} (majority baseline " \
                                f"{test['majority_baseline']:.4f})"
    assert time.perf_counter() - start < 120


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two-step pre-training runs: a BERT with NSP (it has a pooler), an ELECTRA pair and a GPT."""
    root = tmp_path_factory.mktemp("pretrained")
    data = root / "corpus.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x + {i}  # one\n\n" for i in range(40)), encoding="utf-8")
    paths = {}
    for name, objective in (("bert", "nsp"), ("electra", ""), ("gpt", "")):
        cfg = TrainConfig(data=str(data), model=name, objective=objective, n_layer=1, n_head=2, d_model=8,
                          block_size=16, batch_size=2, steps=2, warmup=1, eval_interval=2, eval_batches=1,
                          sample_tokens=0, progress=False, out_dir=str(root / name))
        paths[name] = train(cfg, log=QUIET)["checkpoint"]
    return paths


def test_a_checkpoint_lends_its_body_and_pooler(checkpoints):
    from npformer import checkpoint

    state = checkpoint.load(checkpoints["bert"])
    with one_thread():
        summary = finetune(FinetuneConfig(task="docstrings", checkpoint=checkpoints["bert"], steps=1, lr=1e-12,
                                          warmup=0, block_size=16, batch_size=4, eval_interval=1), log=QUIET)
    net = summary["model"]
    params = dict(net.named_parameters())
    for name in ("embeddings.word_embeddings.weight", "layers.0.mlp.fc.weight"):
        assert_close(params[f"encoder.{name}"].data, state["model"][name], rtol=1e-6)
    assert_close(params["head.pooler.dense.weight"].data, state["model"]["pooler.dense.weight"], rtol=1e-6)
    assert net.encoder.cfg.vocab_size == state["model_config"]["vocab_size"]


def test_an_electra_checkpoint_is_fine_tuned_through_its_discriminator(checkpoints, capsys):
    status = main(["finetune", "--task", "tokens", "--checkpoint", checkpoints["electra"], "--steps", "4",
                   "--eval-interval", "2", "--block-size", "16", "--warmup", "1"])
    out = capsys.readouterr().out
    assert status == 0
    assert "finetune electra" in out and len(re.findall(r"^step \d+: ", out, flags=re.M)) == 3
    assert re.search(r"^test accuracy \d\.\d{4} \(majority baseline \d\.\d{4}\)$", out.strip().splitlines()[-1])


def test_a_gpt_checkpoint_is_refused_by_name(checkpoints, capsys):
    with pytest.raises(FinetuneError, match="checkpoint.*pre-trained encoder.*'gpt'"):
        finetune(FinetuneConfig(checkpoint=checkpoints["gpt"]), log=QUIET)
    assert main(["finetune", "--checkpoint", checkpoints["gpt"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("npformer finetune: error: argument --checkpoint: expected the checkpoint of a "
                          "pre-trained encoder"), err


# -- bad options ----------------------------------------------------------------------------------------
BAD = [("task", "sentiment"), ("model", "gpt"), ("checkpoint", 3), ("n_layer", 0), ("n_head", 5), ("d_model", -1),
       ("dropout", 1.0), ("steps", 0), ("batch_size", 0), ("block_size", 2), ("lr", 0.0), ("lr", float("nan")),
       ("min_lr", 1.0), ("warmup", -1), ("schedule", "step"), ("weight_decay", -0.1), ("grad_clip", -1.0),
       ("eval_interval", 0), ("seed", -1), ("dtype", "float16"), ("steps", 2.5), ("steps", True)]


@pytest.mark.parametrize("name, value", BAD)
def test_a_bad_option_is_named(name, value):
    with pytest.raises(FinetuneError) as info:
        finetune(FinetuneConfig(**{name: value}), log=QUIET)
    assert info.value.field == name and f"argument '{name}'" in str(info.value)
    assert "expected" in str(info.value)


def test_a_missing_checkpoint_and_a_long_block_are_named(tmp_path):
    with pytest.raises(FinetuneError, match="'checkpoint'.*no such file"):
        finetune(FinetuneConfig(checkpoint=str(tmp_path / "none.npz")), log=QUIET)
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(FinetuneError, match="'checkpoint'"):
        finetune(FinetuneConfig(checkpoint=str(tmp_path / "junk.npz")), log=QUIET)


def test_a_checkpoint_longer_block_is_refused(checkpoints):
    with pytest.raises(FinetuneError, match="'block_size'.*at most"):
        finetune(FinetuneConfig(checkpoint=checkpoints["bert"], block_size=17), log=QUIET)


@pytest.mark.parametrize("argv, named", [
    (["--steps", "0"], "--steps"), (["--lr", "-1"], "--lr"), (["--task", "x"], "--task"),
    (["--model", "gpt"], "--model"), (["--d-model", "10", "--n-head", "4"], "--n-head"),
    (["--checkpoint", "ckpt.npz", "--n-layer", "2"], "--n-layer"),
    (["--checkpoint", "ckpt.npz", "--model", "bert"], "--model"),
    (["--checkpoint", "missing.npz"], "--checkpoint")])
def test_the_subcommand_names_a_bad_option_in_one_line(argv, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.npz").write_bytes(b"")
    assert main(["finetune", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"npformer finetune: error: argument {named}"), lines


def test_every_finetune_flag_says_what_it_does_and_its_default(capsys):
    parser = build_parser()[1]["finetune"]
    options = [a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
    assert len(options) == len(FinetuneConfig.__dataclass_fields__)
    for action in options:
        default = FinetuneConfig.__dataclass_fields__[action.dest].default
        assert action.help.endswith(f"(default: {default!r})"), action.option_strings
        assert len(action.help) > 20
    assert main(["finetune", "--help"]) == 0
    shown = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert all(a.option_strings[0] in shown for a in options)


def test_the_wrapper_refuses_what_is_no_encoder_or_head():
    model = encoders("bert")
    head = TokenClassificationHead(6, 2, rng=np.random.default_rng(0), dtype=np.float64)
    expect_rejected(lambda: FinetuneModel(3, head), "FinetuneModel", "encoder")
    expect_rejected(lambda: FinetuneModel(head, head), "FinetuneModel", "encoder")
    expect_rejected(lambda: FinetuneModel(model, model.mlm_head), "FinetuneModel", "head")
    expect_rejected(lambda: finetune("bert", log=QUIET), "finetune", "cfg")


@pytest.mark.parametrize("family", ["bert", "albert", "deberta", "electra"])
def test_backward_after_an_encode_names_the_call_to_match(family):
    """forward then encode: backward() must not consume the encode's cache (LIFO): a RuntimeError says which."""
    from npformer.models.albert import Albert, AlbertConfig
    from npformer.models.bert import Bert, BertConfig
    from npformer.models.deberta import Deberta, DebertaConfig
    from npformer.models.electra import ElectraConfig, ElectraDiscriminator

    shape = dict(vocab_size=11, max_position=8, n_layer=1, n_head=2, d_model=8, d_ff=16, dropout=0.0)
    model = {"bert": lambda: Bert(BertConfig(**shape)), "albert": lambda: Albert(AlbertConfig(**shape, embedding_size=4)),
             "deberta": lambda: Deberta(DebertaConfig(**shape)),
             "electra": lambda: ElectraDiscriminator(ElectraConfig(**shape, embedding_size=8))}[family]()
    ids = np.random.default_rng(0).integers(1, 11, (2, 5))
    labels = np.where(np.arange(5) % 2 == 0, ids, -100)
    if family == "electra":
        model.forward(ids, labels=(labels > 0).astype(np.int64))
    else:
        model.forward(ids, mlm_labels=labels)
    hidden = model.encode(ids)
    with pytest.raises(RuntimeError, match=r"backward: the latest unmatched call was encode"):
        model.backward()
    model.backward_encode(np.zeros_like(hidden))
    model.backward()  # now the forward's turn
    assert model.pending_backwards == 0
