"""Looking inside a model: attention maps, the logit lens, gradient flow during training, loss curves.

Every view is a function that returns a matplotlib ``Figure`` (drawn with the Agg canvas, no
window, no pyplot state) and gives the numbers it plots: ``attention_maps`` and ``logit_lens``
return them beside the figure; ``plot_gradflow`` and ``plot_runs`` draw numbers read from files
that ``read_gradflow`` and ``run_history`` return. So a test or a notebook can check the picture
against the model's own values. ``save_figure(fig, "x.png")`` writes it as a PNG.

The viewers find what they show by the names a model records (``Module.start_recording``),
not by its class, so GPT, LLaMA (and Hugging Face folders loaded as either) and any model that
records the same names work alike:

- ``<...>.probs`` (B, H, T, T): the attention probabilities of each attention layer, in recording
  order (GPT ``blocks.0.attn.probs``, LLaMA ``layers.0.self_attn.probs``; a layer shared over depths,
  ALBERT's ``layer.attention.probs``, ``...probs@2``, ..., once per application); a Mixture-of-Depths
  block's (B, H, k, k) over the k positions it records as ``<stack>.<i>.routed`` (B, k);
- ``<stack>.<i>.out`` (B, T, D): block i's output, the residual stream after it;
- ``<parent>.act`` inside a block and the first ``<parent>.<linear>.out`` recorded before it: the
  MLP activation's output and input (GPT ``mlp.fc.out``, LLaMA ``mlp.gate_proj.out``, T5
  ``DenseReluDense.wi.out``, BART ``fc1.out``; every expert of a mixture of experts).

A prefix LM (trained with ``--objective prefix``) is looked at as ``npformer sample`` runs it:
``prefix=True`` reads the whole prompt as its prefix (``forward(ids, prefix_len=[T])``, ATT.18).

Views:

- ``attention_maps(model, ids, tokens)``: every layer x head as a grid of heatmaps, axes
  labelled with the tokens each layer attends over (``AttentionProbs.positions``);
  ``attention_scores(probs)``: each head's mean entropy and its previous-token and first-token
  scores, measured in the prompt's real positions.
- ``logit_lens(model, ids)``: each block's output read through the final norm and the head
  (``FINAL_NORMS``, ``lm_head`` or a tied table of ``TIED_TABLES``), the top-1 token per layer and
  position with its probability; the last row is the model's own logits.
- ``GradientFlow``: per block during training, the gradient norm, the update/weight ratio and
  the MLP activation's statistics; ``train`` writes them to ``gradflow.json`` with
  ``--gradflow-every N``; ``plot_gradflow`` draws them.
- ``plot_runs(runs)``: several runs' training and validation losses on one plot.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .nn.module import Module, Parameter
from .ops._checks import check_count

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, so GradientFlow (used by train) needs none
    from matplotlib.figure import Figure

# Activation inputs below this count as saturated: GELU(-3) = -0.004 with slope -0.01, SiLU(-3) = -0.14
# with slope -0.09, so a unit whose input sits there passes (almost) nothing forward and little gradient
# back. One threshold for every activation keeps the curves of different models comparable.
SATURATION_THRESHOLD = -3.0

# The statistics GradientFlow records, in the order plot_gradflow draws them, with their panel titles.
GRADFLOW_STATS = {
    "grad_norm": "gradient norm ||g||",
    "update_ratio": "update / weight ||dW|| / ||W||",
    "act_in_mean": "MLP activation input: mean",
    "act_in_std": "MLP activation input: std",
    "act_out_mean": "MLP activation output: mean",
    "act_out_std": "MLP activation output: std",
    "saturated": f"fraction of activation inputs < {SATURATION_THRESHOLD:g}",
}
ACTIVATION_STATS = ("act_in_mean", "act_in_std", "act_out_mean", "act_out_std", "saturated")
OTHER = "other"  # the group of parameters outside the blocks (embeddings, final norm, head)
GRADFLOW_FILE = "gradflow.json"
DPI = 100

_BLOCK_OUT = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\.(\d+)\.out$")  # blocks.3.out, layers.0.out
_PROBS = re.compile(r"^(?:.*\.)?probs(?:@\d+)?$")  # blocks.3.attn.probs, layer.attention.probs@2
# blocks.3 of blocks.3.attn.q_proj.weight
_BLOCK_PREFIX = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*\.\d+)(?:\.|$)")


# -- shared helpers ---------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    """A Figure on the Agg canvas (no pyplot, no window), ``width`` x ``height`` inches at ``DPI``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Union[str, os.PathLike]) -> Path:
    """Write ``fig`` as a PNG of exactly its size in inches x ``DPI`` pixels; returns the path."""
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise TypeError(f"save_figure: argument 'fig' expected a matplotlib Figure, got {type(fig).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not str(path).lower().endswith(".png"):
        raise ValueError(f"save_figure: argument 'path' expected a file name ending in .png, got {path!r}")
    fig.savefig(path, dpi=DPI, format="png")
    return Path(path)


_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "$": r"\$", " ": "\u2423"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)  # a control, format, separator, surrogate, private or unassigned code point: written out
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def display_token(token: str) -> str:
    """A token as a tick label: a space as ``␣``, newline, tab and carriage return as ``\\n``, ``\\t``,
    ``\\r``, ``$`` escaped (not mathtext), every other character that is not printable (a control
    character, U+0000-U+001F and U+007F-U+009F, or a format, separator, surrogate, private-use or
    unassigned one) as its code ``\\x1a``, ``\\u200b``, ``\\U000e0001``, so no glyph is missing or
    invisible; the empty token as ``''``."""
    if not isinstance(token, str):
        raise TypeError(f"display_token: argument 'token' expected a str, got {type(token).__name__}")
    if not token:
        return "''"
    return "".join(_escape_char(ch) for ch in token)


def token_strings(tokenizer, ids: Sequence[int]) -> List[str]:
    """Each id decoded on its own; an id that decodes to nothing readable (a byte of a multi-byte
    character) is shown by its vocabulary entry (``id_to_token``) where the tokenizer has one."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"token_strings: argument 'tokenizer' expected a tokenizer with decode(ids), got "
                        f"{type(tokenizer).__name__}")
    flat = None if isinstance(ids, (str, bytes)) else np.asarray(ids, dtype=object).reshape(-1)
    if flat is None or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in flat):
        raise TypeError(f"token_strings: argument 'ids' expected a sequence of integer ids, got {ids!r:.60}")
    out = []
    for i in flat:
        text = tokenizer.decode([int(i)])
        if (not text or "\ufffd" in text) and hasattr(tokenizer, "id_to_token"):
            text = tokenizer.id_to_token(int(i)) or text
        out.append(text)
    return out


def _check_model(op: str, model: object) -> Module:
    if not isinstance(model, Module) or not callable(getattr(model, "forward", None)):
        raise TypeError(f"{op}: argument 'model' expected an npformer model (a Module with a forward), "
                        f"got {type(model).__name__}")
    return model


def _check_ids(op: str, model: Module, ids: object) -> np.ndarray:
    """One prompt: ids (T,) or (1, T), integers in the model's vocabulary, T within its context."""
    if not isinstance(ids, np.ndarray) or type(ids) is not np.ndarray or not np.issubdtype(ids.dtype, np.integer) \
            or ids.dtype == np.bool_:
        got = f"{type(ids).__name__}" + (f" of {ids.dtype}" if isinstance(ids, np.ndarray) else "")
        raise TypeError(f"{op}: argument 'ids' expected an integer numpy.ndarray of token ids, got {got}")
    if not (ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] == 1)) or ids.size == 0:
        raise ValueError(f"{op}: argument 'ids' expected one prompt of shape (T,) or (1, T) with T >= 1, "
                         f"got shape {ids.shape}")
    ids = ids.reshape(-1)
    cfg = getattr(model, "cfg", None)
    vocab, block = getattr(cfg, "vocab_size", None), getattr(cfg, "block_size", None)
    if ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
        raise ValueError(f"{op}: argument 'ids' expected ids in [0, {vocab}), got ids from {ids.min()} to {ids.max()}")
    if block is not None and ids.size > block:
        raise ValueError(f"{op}: argument 'ids' expected at most the model's context of {block} tokens, "
                         f"got {ids.size}")
    return ids


def _check_tokens(op: str, name: str, tokens: object, T: int) -> List[str]:
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise TypeError(f"{op}: argument '{name}' expected a list of strings (one per id), got "
                        f"{type(tokens).__name__}")
    if len(tokens) != T:
        raise ValueError(f"{op}: argument '{name}' expected {T} tokens (one per id), got {len(tokens)}")
    return list(tokens)


@contextlib.contextmanager
def _inspecting(model: Module):
    """Eval mode (no cache kept) and no recording for the block; the model's mode and any recording in
    progress are put back afterwards."""
    was_training, previous = model.training, model.recorder
    model.eval()
    model.stop_recording()
    try:
        yield
    finally:
        model.stop_recording()
        if previous is not None:  # the recording that was running goes on
            for _, m in model.named_modules():
                object.__setattr__(m, "_recorder", previous)
        model.train(was_training)


def _check_prefix(op: str, prefix: object) -> bool:
    if not isinstance(prefix, (bool, np.bool_)):
        raise TypeError(f"{op}: argument 'prefix' expected a bool, got {type(prefix).__name__}")
    return bool(prefix)


def _forward(model: Module, ids: np.ndarray, prefix: bool):
    """``model.forward(ids[None])``, the whole prompt a prefix LM's prefix when ``prefix`` (ATT.18)."""
    if prefix:
        return model.forward(ids[None], prefix_len=np.array([ids.size]))
    return model.forward(ids[None])


def _recorded_forward(model: Module, ids: np.ndarray, prefix: bool = False):
    """``_forward`` recorded (call inside ``_inspecting``); returns (logits, recorder)."""
    recorder = model.start_recording()
    out = _forward(model, ids, prefix)
    model.stop_recording()
    logits = out[0] if isinstance(out, tuple) else out
    return logits, recorder


def _by_block(pattern: re.Pattern, names) -> List[Tuple[str, int, str]]:
    """(name, block index, stack) of each first-call name matching ``pattern``, in recording order."""
    found = []
    for name in names:
        m = pattern.match(name)
        if m and "@" not in name:
            found.append((name, int(m.group(2)), m.group(1)))
    return found


# -- 1. attention -------------------------------------------------------------------------------------
class AttentionProbs(dict):
    """``{recorded name: (H, T_l, T_l)}`` in recording order, and ``positions``: ``{name: (T_l,) int}``,
    the real positions in the prompt of that layer's queries and keys (0 .. T-1 for a layer that sees
    every token; for a Mixture-of-Depths block the k positions routed through it, ascending)."""

    def __init__(self, probs: Dict[str, np.ndarray], positions: Dict[str, np.ndarray]):
        super().__init__(probs)
        self.positions = positions


def _probs_names(recorder) -> List[str]:
    """The attention probabilities a forward recorded: every ``<...>.probs`` (and ``@k`` of a shared
    layer's later applications) holding a (B, H, T, T) array, in recording order. A router's
    ``probs`` (a mixture of experts', (N, E)) is not attention and is left out."""
    return [name for name in recorder if _PROBS.match(name) and np.ndim(recorder[name]) == 4
            and np.shape(recorder[name])[-1] == np.shape(recorder[name])[-2]]


def _positions_of(recorder, name: str, T_l: int, T: int) -> np.ndarray:
    """The real positions of the queries and keys of ``name``: ``<stack>.<i>.routed`` of its block when
    it routes T_l of the T tokens (Mixture of Depths), else 0 .. T-1."""
    base, at, suffix = name.partition("@")
    block = _BLOCK_PREFIX.match(base)
    routed = None if block is None else f"{block.group(1)}.routed" + (at + suffix)
    if routed in recorder:
        positions = np.asarray(recorder[routed])[0].astype(np.int64)
        if positions.shape == (T_l,):
            return positions
    return np.arange(T)


def attention_probs(model, ids: np.ndarray, *, prefix: bool = False) -> AttentionProbs:
    """The attention probabilities of one prompt, by recorded name: ``{"blocks.0.attn.probs": (H, T, T), ...}``
    in layer order (a copy of what the recorder holds for batch row 0), with their ``positions``
    (``AttentionProbs``). ``prefix=True``: the prompt read as a prefix LM's prefix (ATT.18)."""
    op = "attention_probs"
    _check_model(op, model)
    ids = _check_ids(op, model, ids)
    prefix = _check_prefix(op, prefix)
    with _inspecting(model):
        _, recorder = _recorded_forward(model, ids, prefix)
    return _probs_of(op, recorder, ids.size)


def _probs_of(op: str, recorder, T: int) -> AttentionProbs:
    names = _probs_names(recorder)
    if not names:
        raise ValueError(f"{op}: argument 'model' expected a model that records attention probabilities "
                         f"('<stack>.<i>....probs'), got one that recorded {list(recorder)[:6]}")
    probs = {name: np.array(recorder[name][0]) for name in names}
    return AttentionProbs(probs, {name: _positions_of(recorder, name, p.shape[-1], T) for name, p in probs.items()})


def attention_maps(model, ids: np.ndarray, tokens: Sequence[str], *, head: Optional[Tuple[int, int]] = None,
                   prefix: bool = False):
    """Every layer x head's attention of one prompt as a grid of heatmaps; returns (Figure, probs).

    ids: (T,) or (1, T) token ids; tokens: T strings, the tick labels of both axes (queries down,
    keys across). Each panel is titled ``layer l head h`` and drawn on one colour scale, [0, 1],
    with one colour bar. A layer applied several times (ALBERT's shared layer) has one row per
    application; a Mixture-of-Depths block's panels show its k routed tokens only, labelled with
    them. ``head=(l, h)`` draws that one head alone, large, each probability written in its cell
    when it has at most 16 queries. probs: ``AttentionProbs``, ``{recorded name: (H, T_l, T_l)}`` in
    layer order with each layer's ``positions``. ``prefix=True``: a prefix LM's view of the prompt.
    """
    op = "attention_maps"
    _check_model(op, model)
    ids = _check_ids(op, model, ids)
    tokens = _check_tokens(op, "tokens", tokens, ids.size)
    probs = attention_probs(model, ids, prefix=_check_prefix(op, prefix))
    names = list(probs)
    labels = {name: [tokens[int(i)] for i in probs.positions[name]] for name in names}
    if head is not None:
        if not isinstance(head, (tuple, list)) or len(head) != 2:
            raise TypeError(f"{op}: argument 'head' expected a pair (layer, head), got {head!r}")
        layer = check_count(op, "head", head[0], 0, len(names) - 1)
        h = check_count(op, "head", head[1], 0, probs[names[layer]].shape[0] - 1)
        return _one_head(names[layer], probs[names[layer]], labels[names[layer]], layer, h), probs
    return _grid([probs[n] for n in names], [labels[n] for n in names], ids.size), probs


def _label_axes(ax, labels: List[str], size: float) -> None:
    T = len(labels)
    ax.set_xticks(range(T))
    ax.set_xticklabels(labels, rotation=90, fontsize=size)
    ax.set_yticks(range(T))
    ax.set_yticklabels(labels, fontsize=size)


def _grid(maps: List[np.ndarray], tokens: List[List[str]], T: int):
    """maps[l] (H_l, T_l, T_l) labelled with tokens[l] (T_l strings); T the prompt's length."""
    L, H = len(maps), max(m.shape[0] for m in maps)
    cell = min(max(1.8, 0.22 * T + 0.9), 6.0, 48.0 / max(L, H))
    fig = _new_figure(H * cell + 1.2, L * cell + 0.4)
    axes = fig.subplots(L, H, squeeze=False)
    size = max(3.0, min(8.0, 2.2 * cell * 72 / max(T, 1) / 6))
    image = None
    for l, probs in enumerate(maps):
        labels = [display_token(t) for t in tokens[l]]
        for h in range(H):
            ax = axes[l][h]
            if h >= probs.shape[0]:
                ax.set_visible(False)
                continue
            image = ax.imshow(probs[h], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_title(f"layer {l} head {h}", fontsize=8)
            _label_axes(ax, labels, size)
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.08, top=0.95, wspace=0.6, hspace=0.6)
    cax = fig.add_axes((0.92, 0.2, 0.015, 0.6))
    fig.colorbar(image, cax=cax, label="attention probability")
    return fig


def _one_head(name: str, probs: np.ndarray, tokens: List[str], layer: int, h: int):
    """probs (H, T_l, T_l) of layer ``layer`` (recorded as ``name``), its head h labelled with tokens (T_l)."""
    p, T = probs[h], len(tokens)
    side = min(max(4.0, 0.4 * T + 2.0), 30.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(p, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_title(f"layer {layer} head {h} ({name})")
    _label_axes(ax, [display_token(t) for t in tokens], 9)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if T <= 16:
        for i in range(T):
            for j in range(T):
                ax.text(j, i, f"{p[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if p[i, j] < 0.5 else "black")
    fig.colorbar(image, ax=ax, label="attention probability")
    return fig


def attention_scores(probs: Dict[str, np.ndarray],
                     positions: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Dict[str, np.ndarray]]:
    """Per layer and head: mean entropy (nats), previous-token and first-token scores.

    probs: ``{name: (..., H, T, T)}`` (as ``attention_maps`` returns, or the recorder's (B, H, T, T)).
    positions: ``{name: (T,) int}``, the real positions in the prompt of each layer's queries and
    keys, strictly increasing (default: ``probs.positions`` of an ``AttentionProbs``, else 0 .. T-1
    for every layer). For each head, averaged over the leading axes and the queries:

    - ``entropy``: -sum_j p_ij log p_ij over the keys (0 log 0 = 0), averaged over every query i;
    - ``previous_token``: the mass query i (at real position p_i) puts on the key at real position
      p_i - 1, over the queries with p_i >= 1. A Mixture-of-Depths block whose query's real
      predecessor was not routed through it cannot attend to that token: the query counts with 0;
    - ``first_token``: the mass on the key at real position 0 (0 when position 0 was not routed),
      over the queries with p_i >= 1 (query 0 has only key 0 under a causal mask, which says nothing
      about the head).

    With every layer's positions 0 .. T-1 these are p_{i, i-1} and p_{i, 0} over i >= 1. With no
    query at p_i >= 1 (T = 1) both scores are NaN. Returns ``{name: {"entropy": (H,),
    "previous_token": (H,), "first_token": (H,)}}`` in float64.
    """
    op = "attention_scores"
    if not isinstance(probs, dict) or not probs:
        raise TypeError(f"{op}: argument 'probs' expected a non-empty dict of name -> (..., H, T, T) arrays, "
                        f"got {type(probs).__name__}{' (empty)' if isinstance(probs, dict) else ''}")
    if positions is None:
        positions = getattr(probs, "positions", {})
    if not isinstance(positions, dict):
        raise TypeError(f"{op}: argument 'positions' expected a dict of name -> (T,) int array, got "
                        f"{type(positions).__name__}")
    scores = {}
    for name, p in probs.items():
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            got = type(p).__name__ + (f" of {p.dtype}" if isinstance(p, np.ndarray) else "")
            raise TypeError(f"{op}: argument 'probs' entry {name!r} expected a float numpy.ndarray, got {got}")
        if p.ndim < 3 or p.shape[-1] != p.shape[-2] or p.shape[-1] == 0:
            raise ValueError(f"{op}: argument 'probs' entry {name!r} expected shape (..., H, T, T) of a "
                             f"self-attention, got {p.shape}")
        p = p.astype(np.float64).reshape(-1, *p.shape[-3:])  # (N, H, T, T)
        T = p.shape[-1]
        pos = positions.get(name, np.arange(T))
        if not isinstance(pos, np.ndarray) or pos.dtype.kind not in "iu" or pos.shape != (T,) \
                or (T and pos.min() < 0) or np.any(np.diff(pos) <= 0):
            raise ValueError(f"{op}: argument 'positions' entry {name!r} expected {T} increasing positions >= 0 "
                             f"(an int array), got {pos!r:.80}")
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        entropy = -plogp.sum(axis=-1).mean(axis=(0, 2))  # (H,)
        queries = pos >= 1  # (T,) the queries that have a previous token
        if queries.any():
            previous_key = pos[None, :] == pos[:, None] - 1  # (T, T): key j is query i's real predecessor
            first_key = np.broadcast_to(pos[None, :] == 0, (T, T))  # key j is the prompt's first token
            previous = (p * previous_key).sum(-1)[:, :, queries].mean(axis=(0, 2))
            first = (p * first_key).sum(-1)[:, :, queries].mean(axis=(0, 2))
        else:
            previous = first = np.full(p.shape[1], np.nan)
        scores[name] = {"entropy": entropy, "previous_token": previous, "first_token": first}
    return scores


# -- 2. logit lens ----------------------------------------------------------------------------------
class LogitLens(NamedTuple):
    """The logit lens of one prompt: row l reads block l's output through the final norm and the head."""

    layers: List[str]  # the recorded block outputs, e.g. "blocks.0.out", in order
    top_ids: np.ndarray  # (L, T) the most likely next token at each layer and position
    top_probs: np.ndarray  # (L, T) its probability (softmax of that layer's logits)
    logits: np.ndarray  # (L, T, V)


# Where the viewers look for a language model's final norm and head: the first of these names the
# model has (GPT ln_f, LLaMA norm, Mamba norm_f, ...); the head is lm_head, else the tied embedding
# table (GPT wte, LLaMA embed_tokens, Mamba embeddings, ...), logits = h E^T.
FINAL_NORMS = ("ln_f", "norm_f", "norm", "final_norm", "final_layer_norm")
TIED_TABLES = ("wte", "embed_tokens", "embeddings", "word_embeddings")


def _final_norm_and_head(op: str, model: Module):
    """(norm or None, W (V, D), b or None): the model's final norm (``FINAL_NORMS``) and head (``lm_head``,
    else the tied table of ``TIED_TABLES``).

    A model without a final norm (a post-norm stack, whose last block ends in one) reads the
    block outputs directly. ``logit_lens`` checks that the last block's row equals the model's own
    logits, so a head or norm found wrongly is refused rather than drawn.
    """
    mods = model._modules
    norm = next((mods[n] for n in FINAL_NORMS if n in mods), None)
    head = mods.get("lm_head")
    if head is not None and isinstance(getattr(head, "weight", None), Parameter):
        bias = getattr(head, "bias", None)
        return norm, head.weight.data, None if bias is None else bias.data
    for name in TIED_TABLES:  # a tied head: logits = h E^T
        weight = getattr(mods.get(name), "weight", None)
        if isinstance(weight, Parameter) and weight.data.ndim == 2:
            return norm, weight.data, None
    raise ValueError(f"{op}: argument 'model' expected a language model with an output head (lm_head, or a tied "
                     f"{' / '.join(TIED_TABLES)}), got a {type(model).__name__}")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logit_lens(model, ids: np.ndarray, tokens: Optional[Sequence[str]] = None,
               decode: Optional[Callable[[int], str]] = None, *, prefix: bool = False):
    """Each block's output read as the model's last layer reads it; returns (LogitLens, Figure).

    Block l's output x_l (the recorded ``<stack>.<l>.out``) goes through the final norm and the
    head exactly as the model's own last hidden state does (GPT: ln_f, then x wte^T; LLaMA: norm,
    then lm_head or the tied embed_tokens^T; Mamba: norm_f, then lm_head or the tied embeddings^T;
    a post-norm stack: no norm), so the last row is the model's logits and its top-1 tokens are
    their argmax; a model whose last row would differ is refused (``ValueError`` naming 'model').
    The Figure is a heatmap of the top-1 probabilities (layers down, positions across, the input
    ``tokens`` as x tick labels when given), each cell labelled with its top-1 token (``decode(id)``,
    else the id). ``prefix=True``: the prompt read as a prefix LM's prefix (ATT.18).
    """
    op = "logit_lens"
    _check_model(op, model)
    ids = _check_ids(op, model, ids)
    if tokens is not None:
        tokens = _check_tokens(op, "tokens", tokens, ids.size)
    if decode is not None and not callable(decode):
        raise TypeError(f"{op}: argument 'decode' expected a function id -> text, got {type(decode).__name__}")
    prefix = _check_prefix(op, prefix)
    norm, W, b = _final_norm_and_head(op, model)
    from .ops.linear import linear_forward

    with _inspecting(model):  # the norm below keeps no cache and records nothing
        model_logits, recorder = _recorded_forward(model, ids, prefix)
        found = _by_block(_BLOCK_OUT, recorder)
        if not found:
            raise ValueError(f"{op}: argument 'model' expected a model that records its blocks' outputs "
                             f"('<stack>.<i>.out'), got one that recorded {list(recorder)[:6]}")
        stack = found[-1][2]  # the stack whose output reaches the head: the last one recorded
        layers = [name for name, _, s in found if s == stack]
        rows = []
        for name in layers:
            x = recorder[name][0]  # (T, D)
            h = norm.forward(x) if norm is not None else x
            rows.append(linear_forward(h, W, b)[0])  # (T, V), the model's own head op
    logits = np.stack(rows)  # (L, T, V)
    own = np.asarray(model_logits)[0]
    scale = float(np.max(np.abs(own))) if own.size else 0.0
    if logits[-1].shape != own.shape or not np.allclose(logits[-1], own, rtol=1e-4, atol=1e-4 * scale):
        raise ValueError(f"{op}: argument 'model' expected a model whose last block output, read through its final "
                         f"norm and head, gives its logits, got a {type(model).__name__} whose head or final norm "
                         f"is not one of {FINAL_NORMS} / lm_head / {TIED_TABLES}")
    probs = _softmax(logits)
    top_ids = logits.argmax(axis=-1)
    top_probs = np.take_along_axis(probs, top_ids[..., None], axis=-1)[..., 0]
    lens = LogitLens(layers=layers, top_ids=top_ids, top_probs=top_probs, logits=logits)
    return lens, _lens_figure(lens, tokens, decode)


def _lens_figure(lens: LogitLens, tokens: Optional[List[str]], decode):
    L, T = lens.top_ids.shape
    fig = _new_figure(min(max(5.0, 0.7 * T + 2.5), 40.0), min(max(3.0, 0.45 * L + 1.8), 30.0))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(lens.top_probs, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", interpolation="nearest")
    ax.set_title("logit lens: top-1 next token after each block")
    ax.set_yticks(range(L))
    ax.set_yticklabels(lens.layers, fontsize=8)
    ax.set_ylabel("block output")
    ax.set_xticks(range(T))
    ax.set_xticklabels([display_token(t) for t in tokens] if tokens is not None else [str(t) for t in range(T)],
                       rotation=90, fontsize=8)
    ax.set_xlabel("input token" if tokens is not None else "position")
    for l in range(L):
        for t in range(T):
            i = int(lens.top_ids[l, t])
            text = display_token(decode(i)) if decode is not None else str(i)
            ax.text(t, l, text, ha="center", va="center", fontsize=7,
                    color="white" if lens.top_probs[l, t] < 0.5 else "black")
    fig.colorbar(image, ax=ax, label="top-1 probability")
    fig.subplots_adjust(bottom=0.25, left=0.2)
    return fig


# -- 3. gradient flow ---------------------------------------------------------------------------------
def layer_of(name: str, shared: Sequence[str] = ()) -> str:
    """The group of a parameter: its block's path (``blocks.3`` of ``blocks.3.attn.q_proj.weight``), the
    layer of ``shared`` it lies in (ALBERT's ``layer`` of ``layer.attention.q_proj.weight``), or
    ``"other"`` for a parameter outside the blocks (embeddings, final norm, head)."""
    if not isinstance(name, str):
        raise TypeError(f"layer_of: argument 'name' expected a parameter name (str), got {type(name).__name__}")
    if isinstance(shared, str) or not all(isinstance(s, str) for s in shared):
        raise TypeError(f"layer_of: argument 'shared' expected a sequence of module paths, got {shared!r:.60}")
    m = _BLOCK_PREFIX.match(name)
    if m:
        return m.group(1)
    return next((s for s in shared if name.startswith(s + ".")), OTHER)


def shared_layers(model: Module) -> Tuple[str, ...]:
    """The layers a model applies at several depths with one set of weights (ALBERT's ``layer``): each
    child module of the model with an attention inside (a module with ``q_proj`` and ``k_proj``) and
    no numbered blocks (``<stack>.<i>``, which ``layer_of`` groups one by one)."""
    params = [n for n, _ in model.named_parameters()]
    found = []
    for child, module in model._modules.items():
        under = [n for n in params if n.startswith(child + ".")]
        if not under or any(_BLOCK_PREFIX.match(n) for n in under):
            continue
        if any({"q_proj", "k_proj"} <= set(m._modules) for _, m in module.named_modules()):
            found.append(child)
    return tuple(found)


def _norm(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


class GradientFlow:
    """Per-layer training statistics at chosen steps, kept as lists over steps (``gradflow.json``).

    Parameters are grouped by block (``layer_of``): ``blocks.0`` ... and ``other``, in the order the
    model holds them (an encoder-decoder's encoder blocks before its decoder's). A layer shared over
    depths (ALBERT's ``layer``, ``shared_layers``) is one group: its weights are one set, whose
    gradient is the sum over its applications, and its activation statistics pool every
    application (``layer.mlp.act``, ``layer.mlp.act@2``, ...). At a step, ``collect`` records for
    each group

    - ``grad_norm``: ||g|| over the group's gradients (as passed, or each parameter's ``.grad``);
    - ``update_ratio``: ||W_after - W_before|| / ||W_before|| over the group's weights (NaN if
      ||W_before|| = 0);

    and, from a recorder of that step's forward, for each block's MLP (not for ``other``):

    - ``act_out_mean``, ``act_out_std``: the activation's output, every ``<parent>.act`` recorded in
      the block (GPT and LLaMA ``mlp.act``, LLaMA's silu(gate) * up; T5 ``layer.1.DenseReluDense.act``;
      BART and the Transformer ``act``; each expert's ``mlp.experts.<e>.act``), pooled;
    - ``act_in_mean``, ``act_in_std``: its input, for each ``<parent>.act`` the output of the first
      linear child of ``<parent>`` recorded before it (GPT ``mlp.fc.out``, LLaMA's gate
      ``mlp.gate_proj.out``, T5 ``DenseReluDense.wi.out``, BART ``fc1.out``), pooled;
    - ``saturated``: the fraction of activation inputs below ``SATURATION_THRESHOLD`` (-3), where
      GELU and SiLU pass almost nothing and have almost no slope.

    A statistic that cannot be computed (no recorder, no MLP) is None. ``train`` collects every
    ``gradflow_every`` steps (step % every == 0, counting from 0 as the loss history does), with
    the gradient before clipping, and saves the file with each checkpoint; a resumed run continues
    the file only with the same ``every`` (``resume``), and a run that replaces another
    (``--overwrite``) starts it afresh.
    """

    def __init__(self, model: Module, every: int = 1):
        _check_model("GradientFlow", model)
        self.every = check_count("GradientFlow", "every", every, 1)
        self.shared = shared_layers(model)
        groups = [layer_of(n, self.shared) for n, _ in model.named_parameters()]
        self.layers: List[str] = list(dict.fromkeys(g for g in groups if g != OTHER)) + \
            ([OTHER] if OTHER in groups else [])
        # the linear maps (a 2-D weight of their own), whose outputs are the activations' inputs
        self._linears = {path for path, m in model.named_modules()
                         if isinstance(m._params.get("weight"), Parameter) and m._params["weight"].data.ndim == 2}
        self.steps: List[int] = []
        self.stats: Dict[str, Dict[str, List[Optional[float]]]] = {
            s: {l: [] for l in self.layers if s not in ACTIVATION_STATS or l != OTHER} for s in GRADFLOW_STATS}

    def due(self, step: int) -> bool:
        """Whether ``train`` collects at ``step`` (0-based)."""
        return step % self.every == 0

    @staticmethod
    def snapshot(model: Module) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        """Copies of every parameter's values and gradient (after backward, before clipping and the step)."""
        params = list(model.named_parameters())
        return {n: p.data.copy() for n, p in params}, {n: p.grad.copy() for n, p in params}

    def collect(self, step: int, model: Module, before: Dict[str, np.ndarray], after: Dict[str, np.ndarray],
                recorder=None, grads: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Dict[str, Optional[float]]]:
        """Record the statistics of ``step``: the model after its backward(), its parameters' values
        ``before`` and ``after`` the optimizer step (name -> array), and optionally the step's recorder
        and the gradients to measure (default: each parameter's ``.grad`` now). Returns
        ``{statistic: {layer: value}}`` and appends it."""
        op = "GradientFlow.collect"
        step = check_count(op, "step", step, 0)
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"{op}: argument 'step' expected a step after {self.steps[-1]}, got {step}")
        params = dict(model.named_parameters())
        for arg, mapping in (("before", before), ("after", after), ("grads", grads)):
            if mapping is None and arg == "grads":
                continue
            if not isinstance(mapping, dict) or set(mapping) != set(params):
                got = sorted(mapping)[:3] if isinstance(mapping, dict) else type(mapping).__name__
                raise ValueError(f"{op}: argument '{arg}' expected a dict of every parameter's name -> array, "
                                 f"got {got}")
            for n, a in mapping.items():
                if not isinstance(a, np.ndarray) or a.shape != params[n].data.shape:
                    raise ValueError(f"{op}: argument '{arg}' entry {n!r} expected an array of shape "
                                     f"{params[n].data.shape}, got {getattr(a, 'shape', type(a).__name__)}")
        grads = grads if grads is not None else {n: p.grad for n, p in params.items()}
        row: Dict[str, Dict[str, Optional[float]]] = {s: {} for s in GRADFLOW_STATS}
        for layer in self.layers:
            names = [n for n in params if layer_of(n, self.shared) == layer]
            weight = _norm(before[n] for n in names)
            row["grad_norm"][layer] = _norm(grads[n] for n in names)
            row["update_ratio"][layer] = _norm(after[n].astype(np.float64) - before[n] for n in names) / weight \
                if weight > 0 else float("nan")
            if layer != OTHER:
                for s, v in _activation_stats(recorder, layer, self._linears).items():
                    row[s][layer] = v
        self.steps.append(step)
        for s, values in self.stats.items():
            for layer, series in values.items():
                series.append(row[s].get(layer))
        return row

    # -- the file ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """{"every", "saturation_threshold", "layers", "steps", and each statistic: {layer: [value per step]}}
        (NaN and missing values as None, so the file is plain JSON)."""
        def clean(v):
            return None if v is None or not math.isfinite(v) else float(v)

        out = {"every": self.every, "saturation_threshold": SATURATION_THRESHOLD, "layers": list(self.layers),
               "steps": list(self.steps)}
        for s, values in self.stats.items():
            out[s] = {layer: [clean(v) for v in series] for layer, series in values.items()}
        return out

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``to_dict()`` as JSON, atomically (a temporary file renamed over the old one)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def resume(self, path: Union[str, os.PathLike], start: int) -> None:
        """Continue the file a run saved: its entries of the steps before ``start`` (the checkpoint's step).

        A file of other layers, one recorded every other number of steps than ``every`` (its entries
        would not be this run's), or not a gradflow file, raises ``ValueError`` naming ``path``; no
        file leaves the collector empty.
        """
        op = "GradientFlow.resume"
        path = Path(path)
        if not path.exists():
            return
        data = read_gradflow(path, op=op)
        if data["layers"] != self.layers:
            raise ValueError(f"{op}: argument 'path' expected the layers of this model {self.layers[:4]}..., "
                             f"got {data['layers'][:4]}... in {path}")
        if data.get("every", self.every) != self.every:
            raise ValueError(f"{op}: argument 'path' expected a file recorded every {self.every} steps (this run's "
                             f"gradflow_every), got one recorded every {data['every']} steps in {path}")
        keep = [i for i, s in enumerate(data["steps"]) if s < start]
        self.steps = [data["steps"][i] for i in keep]
        for s, values in self.stats.items():
            for layer in values:
                values[layer] = [data[s][layer][i] for i in keep]


def _activation_stats(recorder, layer: str, linears) -> Dict[str, Optional[float]]:
    """The pooled statistics of every ``<parent>.act`` recorded in ``layer`` (any application, ``@k``) and
    of its input, the first ``<parent>.<child>.out`` (same application) recorded before it whose
    ``<parent>.<child>`` is in ``linears``."""
    none = {s: None for s in ACTIVATION_STATS}
    if recorder is None:
        return none
    names = list(recorder)
    outs, ins = [], []
    for i, name in enumerate(names):
        base, at, suffix = name.partition("@")
        if not base.startswith(layer + ".") or not base.endswith(".act"):
            continue
        parent = base[:-len(".act")]
        outs.append(np.asarray(recorder[name], dtype=np.float64).reshape(-1))
        for before in names[:i]:
            b_base, b_at, b_suffix = before.partition("@")
            child = b_base[len(parent) + 1:-len(".out")] if b_base.startswith(parent + ".") \
                and b_base.endswith(".out") else ""
            if child and "." not in child and f"{parent}.{child}" in linears and (b_at, b_suffix) == (at, suffix):
                ins.append(np.asarray(recorder[before], dtype=np.float64).reshape(-1))
                break
        else:
            ins.append(None)
    if not outs:
        return none
    a_out = np.concatenate(outs)
    stats = {"act_out_mean": float(a_out.mean()), "act_out_std": float(a_out.std()),
             "act_in_mean": None, "act_in_std": None, "saturated": None}
    if all(a is not None for a in ins):
        a_in = np.concatenate(ins)
        stats.update(act_in_mean=float(a_in.mean()), act_in_std=float(a_in.std()),
                     saturated=float(np.mean(a_in < SATURATION_THRESHOLD)))
    return stats


def read_gradflow(path: Union[str, os.PathLike], op: str = "read_gradflow") -> dict:
    """The contents of a ``gradflow.json`` (or of the one in a run folder), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / GRADFLOW_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{op}: argument 'path' expected a readable {GRADFLOW_FILE}, got {str(path)!r}: {e}") from None
    _check_gradflow(op, "path", data, str(path))
    return data


def _check_gradflow(op: str, arg: str, data: object, where: str) -> None:
    def bad(what: str) -> ValueError:
        return ValueError(f"{op}: argument '{arg}' expected gradient-flow data (as GradientFlow.to_dict), "
                          f"but {where} {what}")

    if not isinstance(data, dict):
        raise bad(f"is a {type(data).__name__}")
    missing = [k for k in ("layers", "steps", *GRADFLOW_STATS) if k not in data]
    if missing:
        raise bad(f"has no {missing}")
    layers, steps = data["layers"], data["steps"]
    if not isinstance(layers, list) or not all(isinstance(l, str) for l in layers):
        raise bad("has 'layers' that is not a list of names")
    if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
        raise bad("has 'steps' that is not a list of integers")
    for s in GRADFLOW_STATS:
        values = data[s]
        want = [l for l in layers if s not in ACTIVATION_STATS or l != OTHER]
        if not isinstance(values, dict) or sorted(values) != sorted(want):
            raise bad(f"has '{s}' without one series per layer {want[:4]}")
        for layer, series in values.items():
            if not isinstance(series, list) or len(series) != len(steps) or \
                    not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in series):
                raise bad(f"has '{s}/{layer}' that is not one number (or null) per step")


def plot_gradflow(path_or_data) -> "Figure":
    """One panel per statistic (``GRADFLOW_STATS``), one line per layer over the steps.

    path_or_data: a ``gradflow.json``, a run folder holding one, a ``GradientFlow`` or its ``to_dict()``.
    Norms and ratios are drawn on a log scale where every value is positive.
    """
    op = "plot_gradflow"
    if isinstance(path_or_data, GradientFlow):
        data = path_or_data.to_dict()
    elif isinstance(path_or_data, dict):
        _check_gradflow(op, "path_or_data", path_or_data, "the dict")
        data = path_or_data
    elif isinstance(path_or_data, (str, os.PathLike)):
        try:
            data = read_gradflow(path_or_data, op)
        except ValueError as e:
            raise ValueError(str(e).replace("argument 'path'", "argument 'path_or_data'")) from None
    else:
        raise TypeError(f"{op}: argument 'path_or_data' expected a gradflow.json path, a run folder, a "
                        f"GradientFlow or its to_dict(), got {type(path_or_data).__name__}")
    fig = _new_figure(12.0, 13.0)
    axes = fig.subplots(4, 2).reshape(-1)
    fig.delaxes(axes[-1])
    steps = data["steps"]
    for ax, (stat, title) in zip(axes, GRADFLOW_STATS.items()):
        positive = True
        for layer, series in data[stat].items():
            y = np.array([np.nan if v is None else v for v in series], dtype=np.float64)
            positive &= bool(np.all(y[np.isfinite(y)] > 0)) and np.isfinite(y).any()
            ax.plot(steps, y, marker="." if len(steps) < 30 else None, lw=1.0, label=layer)
        if positive and stat in ("grad_norm", "update_ratio"):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.05, top=0.95, hspace=0.45, wspace=0.25)
    return fig


# -- 4. loss curves -----------------------------------------------------------------------------------
def run_history(run: Union[str, os.PathLike], op: str = "run_history", arg: str = "run") -> dict:
    """The loss history a training checkpoint holds (a ckpt file, or the run folder holding one):
    ``{"steps", "train_loss", "val_steps", "val_loss"}``."""
    from . import checkpoint
    from .train import both_formats, saved_runs

    if not isinstance(run, (str, os.PathLike)):
        raise TypeError(f"{op}: argument '{arg}' expected a run folder or checkpoint path, got {type(run).__name__}")
    path = Path(run)
    if path.is_dir():
        both = both_formats(path)
        if both:
            raise ValueError(f"{op}: argument '{arg}' expected one run in {path}, but {both}")
        found = saved_runs(path)
        if not found:
            raise ValueError(f"{op}: argument '{arg}' expected a run folder holding ckpt.npz or ckpt.safetensors, "
                             f"got {str(path)!r}")
        path = found[0]
    try:
        state = checkpoint.load(path)
    except (checkpoint.CheckpointError, OSError, ValueError) as e:
        raise ValueError(f"{op}: argument '{arg}' expected a training checkpoint, got {str(path)!r}: {e}") from None
    history = state.get("history")
    keys = ("steps", "train_loss", "val_steps", "val_loss")
    if not isinstance(history, dict) or not all(isinstance(history.get(k), list) for k in keys):
        raise ValueError(f"{op}: argument '{arg}' expected a training checkpoint with a loss history, got "
                         f"{str(path)!r}")
    return {k: list(history[k]) for k in keys}


def plot_runs(runs: Sequence[Union[str, os.PathLike]], labels: Optional[Sequence[str]] = None) -> "Figure":
    """Several runs' training (thin line) and validation (dots) losses on one plot, one colour per run,
    each run's final validation perplexity exp(loss) in the legend. runs: run folders or checkpoint
    files; labels: one per run (default: each run's folder name)."""
    op = "plot_runs"
    if isinstance(runs, (str, os.PathLike)) or not isinstance(runs, (list, tuple)) or not runs:
        raise TypeError(f"{op}: argument 'runs' expected a non-empty list of run folders or checkpoints, "
                        f"got {runs!r:.80}")
    if labels is None:
        labels = [(Path(r) if Path(r).is_dir() else Path(r).parent).name or str(r) for r in runs]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(l, str) for l in labels):
        raise TypeError(f"{op}: argument 'labels' expected a list of strings, got {labels!r:.80}")
    if len(labels) != len(runs):
        raise ValueError(f"{op}: argument 'labels' expected one label per run ({len(runs)}), got {len(labels)}")
    histories = [run_history(r, op, "runs") for r in runs]
    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for history, label, colour in zip(histories, labels, colours):
        ax.plot(history["steps"], history["train_loss"], lw=0.8, alpha=0.6, color=colour, label=f"{label} train")
        if history["val_loss"]:
            ppl = math.exp(history["val_loss"][-1])
            ax.plot(history["val_steps"], history["val_loss"], "o-", color=colour,
                    label=f"{label} val (final ppl {ppl:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    return fig
