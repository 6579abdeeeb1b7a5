"""DeBERTa-v2/v3 as a masked-language model: disentangled attention over shared relative embeddings.

Read it beside ``bert.py``: the same post-norm encoder layer and tied MLM head, with three
differences. (1) Positions: by default no absolute position table at all
(``position_biased_input=False``, DeBERTa-v3's setting; ``True`` adds a learned table as BERT
does); instead every layer's attention adds content-to-position and position-to-content
scores read from one table of relative embeddings ``rel_embeddings`` (2 S, D), shared by
all layers, LayerNorm'd once per forward (``norm_rel_ebd``), and projected in each layer by
that layer's own query and key projections (``share_att_key``) or by separate ones
(``pos_query_proj``, ``pos_key_proj``). The op is ``ops/disentangled_attention.py``
(proof: ``proofs/disentangled_attention.md``), with relative positions log-bucketed
(``position_buckets``, ``max_relative_positions``). (2) Padding: the attention mask is the
pairwise product of the (B, T) padding mask, so a padding query sees no key (its row is
uniform, as the op documents), and the embeddings' output is zeroed at padding. (3) The
scale is 1/sqrt(D_h (1 + n)) for n position terms, the square root rounded to float32, as
Hugging Face computes it (so that float64 logits agree with it to round-off).

Gradients: ``rel_embeddings`` collects one contribution from every layer (each layer's
backward returns the gradient of its (2 S, D) input, summed by ``backward`` before the one
LayerNorm backward); with ``share_att_key`` a layer's query and key weights each get two
contributions, from the content and from the relative rows.

The enhanced mask decoder (EMD), ``emd_layers`` > 0. The DeBERTa paper (section 3.3) feeds
absolute positions back in just before the MLM head. With H the input of the last layer (the
second-to-last layer's output; the embeddings' output in a one-layer model) and P the rows
0..T-1 of a table of absolute positions ``emd_position_embeddings`` (max_position, D), the
query stream starts as I = H + P, and the last layer, with its own weights, is applied
``emd_layers`` times (the paper's setting: 2) as ``layer(H, query_states=I)``: queries are
projected from I, keys and values from H (so content-to-position reads I's queries and
position-to-content H's keys), the attention's residual adds I, not H, then the layer's MLP;
each application's output is the next I, and the MLM head reads the last one. The encoder is
computed in full first, as in the paper's code: the last layer's ordinary output is then not
on the path to the loss and gets a zero gradient (its backward still runs, adding zeros, to
consume its cache). The last layer's parameters collect the gradients of its ordinary call
and of every EMD call; H collects the gradient of the ordinary call (zero) and, as keys and
values and through I, of every EMD call; the table collects the gradient of I. ``encode``
(the body a fine-tuning head reads) never runs the EMD: it is a pre-training decoder.
``emd_layers = 0`` (the default) is Hugging Face's ``DebertaV2ForMaskedLM`` exactly: it keeps
the code path (``z_steps``, ``query_states``) but sets ``z_steps = 0``, and even when it runs,
it adds no absolute positions; released checkpoints' EMD tensors (``mask_predictions.*``) are
dropped on load by transformers and here. A model with an EMD has no Hugging Face folder
(``hf/deberta_map`` refuses to save it).

Not represented (refused by name where a Hugging Face config asks for it, ``hf/deberta_map``):
the convolution beside the first layer (``conv_kernel_size > 0``), a separate embedding width
(``embedding_size``), activations other than the exact GELU, dropout on attention
probabilities (``dropout`` is applied to the embeddings, the relative embeddings of every
layer, and each sublayer's output, as Hugging Face's ``hidden_dropout_prob``).

Parameter names: ``embeddings.word_embeddings.weight``, ``embeddings.position_embeddings.weight``
(with ``position_biased_input``), ``embeddings.token_type_embeddings.weight`` (type_vocab_size > 0),
``embeddings.LayerNorm.*``, ``rel_embeddings.weight``, ``rel_norm.*`` (with ``norm_rel_ebd``),
``layers.{i}.attention.{query_proj,key_proj,value_proj,o_proj}.*`` (and
``pos_key_proj``/``pos_query_proj`` without ``share_att_key``), ``layers.{i}.attention_norm.*``,
``layers.{i}.mlp.{fc,proj}.*``, ``layers.{i}.output_norm.*``, ``emd_position_embeddings.weight`` (with
``emd_layers``), ``mlm_head.{dense,layer_norm}.*``, ``mlm_head.bias`` (the decoder is the word table).

Shapes: ids (B, T) int, hidden (B, T, D), rel (2 S, D), mlm_logits (B, T, V); D_h = D / H per head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..nn.attention import merge_heads, split_heads
from ..nn.encoder import MLMHead, check_encoder_config, check_mlm_labels, key_padding_mask
from ..nn.heads import EncodeCache, peek_forward_cache, pop_encode_cache
from ..nn.layers import Dropout, Embedding, LayerNorm, Linear, check_dout
from ..nn.lm import IGNORE_INDEX
from ..nn.mlp import MLP
from ..nn.module import Module, ModuleList, atomic
from ..ops._checks import MAX_POSITION, check_bool, check_count, check_float, check_int, check_same_dtype, check_shape
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.disentangled_attention import (
    deberta_relative_indices,
    disentangled_attention_backward,
    disentangled_attention_forward,
    pairwise_attention_mask,
)
from ..ops.linear import linear_backward, linear_forward

__all__ = ["DebertaConfig", "Deberta", "DebertaOutputs", "IGNORE_INDEX", "MAX_EMD_LAYERS", "deberta_scale"]

MAX_EMD_LAYERS = 64  # applications of the last layer in the enhanced mask decoder (the paper's: 2)


def deberta_scale(head_dim: int, n_terms: int) -> float:
    """c = 1 / sqrt(D_h (1 + n)) with the square root rounded to float32, as Hugging Face computes it (DA.7)."""
    return 1.0 / float(np.sqrt(np.float32(head_dim * (1 + n_terms))))


@dataclass
class DebertaConfig:
    """A DeBERTa-v2/v3 masked-LM's shape; Hugging Face's field name, where it differs, in the comment."""

    vocab_size: int = 65
    max_position: int = 128  # max_position_embeddings: rows of the absolute tables (position_biased_input, EMD)
    type_vocab_size: int = 0  # 0: no token-type table
    n_layer: int = 2  # num_hidden_layers
    n_head: int = 4  # num_attention_heads
    d_model: int = 128  # hidden_size
    d_ff: int = 512  # intermediate_size
    dropout: float = 0.1  # hidden_dropout_prob (embeddings, relative embeddings, sublayer outputs)
    layer_norm_eps: float = 1e-7
    pad_token_id: Optional[int] = 0  # the word row a lookup never trains; None: none
    position_biased_input: bool = False  # True: add a learned absolute position table to the embeddings
    position_buckets: Optional[int] = 256  # N log buckets (span S = N); None: no bucketing (S = max_relative_positions)
    max_relative_positions: int = 512  # M of the log buckets (DA.1), or the span S without bucketing
    pos_att_type: Tuple[str, ...] = ("p2c", "c2p")  # which position terms the scores add
    share_att_key: bool = True  # project the relative rows with the content query/key projections
    norm_rel_ebd: bool = True  # norm_rel_ebd "layer_norm": LayerNorm the relative table once per forward
    emd_layers: int = 0  # enhanced mask decoder: applications of the last layer before the MLM head; 0: none (HF)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Every field checked when the config is made, so a bad one never builds a model."""
        op = "DebertaConfig"
        check_encoder_config(op, self)  # the fields every encoder has
        for name in ("position_biased_input", "share_att_key", "norm_rel_ebd"):
            setattr(self, name, check_bool(op, name, getattr(self, name)))
        if self.position_buckets is None:
            self.max_relative_positions = check_count(op, "max_relative_positions", self.max_relative_positions, 1,
                                                      MAX_POSITION)
        else:
            self.position_buckets = check_count(op, "position_buckets", self.position_buckets, 2, MAX_POSITION)
            self.max_relative_positions = check_count(  # ln((M - 1) / mid) > 0 in (DA.1)
                op, "max_relative_positions", self.max_relative_positions, self.position_buckets // 2 + 2,
                MAX_POSITION)
        terms = self.pos_att_type
        if (not isinstance(terms, (tuple, list)) or not all(isinstance(t, str) and t in ("c2p", "p2c") for t in terms)
                or len(set(terms)) != len(terms)):
            raise ValueError(f"{op}: argument 'pos_att_type' expected a tuple of distinct names from "
                             f"('c2p', 'p2c'), got {terms!r}")
        self.pos_att_type = tuple(terms)
        self.emd_layers = check_count(op, "emd_layers", self.emd_layers, 0, MAX_EMD_LAYERS)

    @property
    def att_span(self) -> int:
        """S: the relative table has 2 S rows."""
        return self.max_relative_positions if self.position_buckets is None else self.position_buckets

    @property
    def block_size(self) -> Optional[int]:
        """The longest sequence: max_position with an absolute table (input or EMD), else None (no limit)."""
        return self.max_position if self.position_biased_input or self.emd_layers else None

    def to_dict(self) -> dict:
        return asdict(self)


class DebertaOutputs(NamedTuple):
    mlm_logits: np.ndarray  # (B, T, V)


class DebertaCache(NamedTuple):
    """One training forward of ``Deberta``: the loss's op cache (None without labels)."""

    mlm_loss: Optional[CrossEntropyCache]


class DebertaBody(NamedTuple):
    """What the layers read, kept for the enhanced mask decoder, which applies the last layer again."""

    last_input: np.ndarray  # (B, T, D)  H: the input of the last layer
    rel: np.ndarray  # (2 S, D)  the normalised relative table
    visible: Optional[np.ndarray]  # (B, 1, T, T) bool or None
    c2p_index: np.ndarray  # (T, T)
    p2c_index: np.ndarray  # (T, T)


# -- embeddings ---------------------------------------------------------------------------------------
class DebertaEmbeddingsCache(NamedTuple):
    word_frozen: Optional[np.ndarray]  # (B, T) bool: ids == pad_token_id (None: no frozen row)
    tokens: Optional[np.ndarray]  # (B, T, 1) of the dtype: 1 at a token, 0 at padding (None: no padding)
    out_shape: Tuple[int, ...]  # (B, T, D)


class DebertaEmbeddings(Module):
    """drop(LN(word[ids] (+ position[0..T-1]) (+ token_type[types])) * tokens): zero at padding."""

    def __init__(self, cfg: DebertaConfig, *, rng: np.random.Generator, dtype):
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, dtype=dtype)
        if cfg.position_biased_input:
            self.position_embeddings = Embedding(cfg.max_position, cfg.d_model, rng=rng, dtype=dtype)
        if cfg.type_vocab_size:
            self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.d_model, rng=rng, dtype=dtype)
        self.LayerNorm = LayerNorm(cfg.d_model, cfg.layer_norm_eps, dtype=dtype)
        self.dropout = Dropout(cfg.dropout, rng=rng)
        if cfg.pad_token_id is not None:
            self.word_embeddings.weight.data[cfg.pad_token_id] = 0  # a frozen row starts at zero, as torch's

    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray], pad: Optional[np.ndarray]) -> np.ndarray:
        """ids (B, T), token_type_ids (B, T) or None, pad (B, T) bool True at padding or None -> (B, T, D)."""
        B, T = ids.shape
        x = self.word_embeddings.forward(ids)
        if self.position_embeddings_on:
            x = x + self.position_embeddings.forward(np.broadcast_to(np.arange(T), (B, T)))
        if self.token_type_on:
            x = x + self.token_type_embeddings.forward(np.zeros((B, T), np.int64) if token_type_ids is None
                                                       else token_type_ids)
        h = self.LayerNorm.forward(x)
        tokens = None if pad is None else (~pad)[..., None].astype(h.dtype)
        if tokens is not None:
            h = h * tokens  # padding's embeddings are zero
        out = self.dropout.forward(h)
        self.save_cache(DebertaEmbeddingsCache(
            word_frozen=None if self.pad_token_id is None else ids == self.pad_token_id, tokens=tokens,
            out_shape=out.shape))
        self.record("out", out)
        return out

    @property
    def position_embeddings_on(self) -> bool:
        return "position_embeddings" in self._modules

    @property
    def token_type_on(self) -> bool:
        return "token_type_embeddings" in self._modules

    @atomic
    def backward(self, dout: np.ndarray) -> None:
        """dout (B, T, D): the tables' gradients; a lookup of the frozen pad row adds nothing to it."""
        cache = self.pop_cache()
        dh = self.dropout.backward(dout)
        if cache.tokens is not None:
            dh = dh * cache.tokens
        dx = self.LayerNorm.backward(dh)  # the sum of the lookups gets dx in each table
        if self.token_type_on:
            self.token_type_embeddings.backward(dx)
        if self.position_embeddings_on:
            self.position_embeddings.backward(dx)
        dword = dx if cache.word_frozen is None else np.where(cache.word_frozen[..., None], 0, dx)
        self.word_embeddings.backward(dword)


# -- attention ----------------------------------------------------------------------------------------
class RelativeProjection(NamedTuple):
    """One projection of the relative rows: which Linear's weights, and linear_forward's cache."""

    proj: Linear
    cache: object  # LinearCache of (2 S, D) @ W^T + b


class DisentangledAttentionLayerCache(NamedTuple):
    op: object  # DisentangledAttentionCache
    k_r: Optional[RelativeProjection]  # "c2p"
    q_r: Optional[RelativeProjection]  # "p2c"
    rel_shape: Tuple[int, ...]  # (2 S, D)
    split: bool  # the queries came from query_states, not from x


class DisentangledSelfAttention(Module):
    """o_proj(disentangled_attention(query_proj(q), key_proj(x), value_proj(x), rel projections)), q = x
    unless ``query_states`` is given (the enhanced mask decoder's query stream).

    rel (2 S, D) is dropped out here (each layer its own mask), then projected: by query_proj /
    key_proj themselves with ``share_att_key``, else by pos_query_proj / pos_key_proj.
    """

    def __init__(self, cfg: DebertaConfig, *, rng: np.random.Generator, dtype):
        super().__init__()
        D = cfg.d_model
        self.n_head = cfg.n_head
        self.terms = cfg.pos_att_type
        self.query_proj = Linear(D, D, True, rng=rng, dtype=dtype)
        self.key_proj = Linear(D, D, True, rng=rng, dtype=dtype)
        self.value_proj = Linear(D, D, True, rng=rng, dtype=dtype)
        if not cfg.share_att_key:
            if "c2p" in self.terms:
                self.pos_key_proj = Linear(D, D, True, rng=rng, dtype=dtype)
            if "p2c" in self.terms:
                self.pos_query_proj = Linear(D, D, True, rng=rng, dtype=dtype)
        self.share = cfg.share_att_key
        self.rel_dropout = Dropout(cfg.dropout, rng=rng)
        self.o_proj = Linear(D, D, True, rng=rng, dtype=dtype)
        self.scale = deberta_scale(D // cfg.n_head, len(self.terms))

    def _project_rel(self, rel: np.ndarray, term: str) -> Tuple[np.ndarray, RelativeProjection]:
        """rel (2 S, D) -> (H, 2 S, D_h) through the term's projection, its cache kept for the backward."""
        if term == "c2p":
            proj = self.key_proj if self.share else self.pos_key_proj
        else:
            proj = self.query_proj if self.share else self.pos_query_proj
        y, cache = linear_forward(rel, proj.weight.data, proj.bias.data)
        return split_heads(y[None], self.n_head)[0], RelativeProjection(proj=proj, cache=cache)

    @atomic
    def forward(self, x: np.ndarray, rel: np.ndarray, visible: Optional[np.ndarray], c2p_index: np.ndarray,
                p2c_index: np.ndarray, query_states: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, T, D), rel (2 S, D), visible (B, 1, T, T) bool or None, indices (T, T), query_states (B, T, D)
        or None (queries from x) -> (B, T, D)."""
        H = self.n_head
        q_c = split_heads(self.query_proj.forward(x if query_states is None else query_states), H)  # (B, H, T, D_h)
        k_c = split_heads(self.key_proj.forward(x), H)
        v = split_heads(self.value_proj.forward(x), H)
        rel = self.rel_dropout.forward(rel)
        k_r, k_r_proj = self._project_rel(rel, "c2p") if "c2p" in self.terms else (None, None)
        q_r, q_r_proj = self._project_rel(rel, "p2c") if "p2c" in self.terms else (None, None)
        out, op_cache = disentangled_attention_forward(
            q_c, k_c, v, q_r, k_r, c2p_index=c2p_index if k_r is not None else None,
            p2c_index=p2c_index if q_r is not None else None, attention_mask=visible, pos_att_type=self.terms,
            scale=self.scale)
        self.record("probs", op_cache.probs)
        y = self.o_proj.forward(merge_heads(out))
        self.save_cache(DisentangledAttentionLayerCache(op=op_cache, k_r=k_r_proj, q_r=q_r_proj,
                                                         rel_shape=rel.shape, split=query_states is not None))
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """dy (B, T, D) -> (dx (B, T, D), drel (2 S, D), dquery (B, T, D) or None): the forward's lines in reverse.

        With ``query_states`` the two streams' gradients stay apart (DA.18): dquery through the query
        projection, dx through the key and value projections; without it dquery is None and dx has all three.
        """
        cache = self.pop_cache()
        H = self.n_head
        dout = split_heads(self.o_proj.backward(dy), H)  # (B, H, T, D_h)
        dq_c, dk_c, dv, dq_r, dk_r = disentangled_attention_backward(dout, cache.op)
        drel = np.zeros(cache.rel_shape, dy.dtype)
        for name, d_heads, rp in (("dq_r", dq_r, cache.q_r), ("dk_r", dk_r, cache.k_r)):
            if d_heads is None:
                continue
            self.record(name, d_heads)
            d_rows = merge_heads(d_heads[None])[0]  # (2 S, D)
            d_in, dW, db = linear_backward(d_rows, rp.cache)
            rp.proj.weight.grad += dW  # shared key: the content call's gradient joins it below
            rp.proj.bias.grad += db
            drel += d_in
        drel = self.rel_dropout.backward(drel)
        dx = self.value_proj.backward(merge_heads(dv))  # (DA.18)
        dx = dx + self.key_proj.backward(merge_heads(dk_c))  # (DA.18)
        dquery = self.query_proj.backward(merge_heads(dq_c))  # (DA.18)
        if not cache.split:
            return dx + dquery, drel, None  # (DA.18)  one stream: the two parts add up
        return dx, drel, dquery


class DebertaLayerCache(NamedTuple):
    out_shape: Tuple[int, ...]
    split: bool  # the forward had query_states


class DebertaLayer(Module):
    """h = attention_norm(q + drop_1(attention(x, rel, q))), out = output_norm(h + drop_2(mlp(h))), q = x
    unless ``query_states`` is given (the enhanced mask decoder: queries and the residual from q, keys and
    values from x)."""

    def __init__(self, cfg: DebertaConfig, *, rng: np.random.Generator, dtype):
        super().__init__()
        self.attention = DisentangledSelfAttention(cfg, rng=rng, dtype=dtype)
        self.drop_1 = Dropout(cfg.dropout, rng=rng)
        self.attention_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, True, "none", rng=rng, dtype=dtype)
        self.drop_2 = Dropout(cfg.dropout, rng=rng)
        self.output_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps, dtype=dtype)

    @atomic
    def forward(self, x, rel, visible, c2p_index, p2c_index, query_states=None) -> np.ndarray:
        """x (B, T, D), rel (2 S, D), visible (B, 1, T, T) or None, indices (T, T), query_states (B, T, D) or
        None -> (B, T, D)."""
        if query_states is not None:
            check_float("DebertaLayer.forward", "query_states", query_states)
            check_shape("DebertaLayer.forward", "query_states", query_states, x.shape)
            check_same_dtype("DebertaLayer.forward", "x", x, query_states=query_states)
        q = x if query_states is None else query_states
        a = self.attention.forward(x, rel, visible, c2p_index, p2c_index, query_states)
        h = self.attention_norm.forward(q + self.drop_1.forward(a))
        m = self.mlp.forward(h)
        out = self.output_norm.forward(h + self.drop_2.forward(m))
        self.save_cache(DebertaLayerCache(out_shape=out.shape, split=query_states is not None))
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """dout (B, T, D) -> (dx (B, T, D), drel (2 S, D), dquery (B, T, D) or None).

        A call with ``query_states`` returns its gradient apart as dquery (the residual and the query
        projection), dx then being the keys' and values' share alone (DA.18); a call without has dquery None.
        """
        norm = self.output_norm.weight
        check_dout(self, "DebertaLayer.backward", "dout", dout, norm.shape[0], norm.data.dtype)
        cache = self.pop_cache()
        dz_2 = self.output_norm.backward(dout)  # into h + drop_2(m)
        dh = dz_2 + self.mlp.backward(self.drop_2.backward(dz_2))  # residual: identity path plus MLP path
        dz_1 = self.attention_norm.backward(dh)  # into q + drop_1(a)
        da_x, drel, da_q = self.attention.backward(self.drop_1.backward(dz_1))
        if not cache.split:
            dx = dz_1 + da_x  # residual again
            self.record("dx", dx)
            return dx, drel, None
        dquery = dz_1 + da_q  # (DA.18)  the residual belongs to the query stream
        self.record("dx", da_x)
        self.record("dquery", dquery)
        return da_x, drel, dquery


# -- the model ----------------------------------------------------------------------------------------
class Deberta(Module):
    """embeddings -> layers (each reading the shared, normalised relative table) -> mlm_head (tied)."""

    def __init__(self, cfg: DebertaConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, DebertaConfig):
            raise TypeError(f"Deberta: argument 'cfg' expected a DebertaConfig, got {type(cfg).__name__}")
        check_count("Deberta", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # init normal(0, 0.02), then dropout masks
        dtype = np.dtype(cfg.dtype)
        self.embeddings = DebertaEmbeddings(cfg, rng=rng, dtype=dtype)
        self.rel_embeddings = Embedding(2 * cfg.att_span, cfg.d_model, rng=rng, dtype=dtype)  # its weight only
        if cfg.norm_rel_ebd:
            self.rel_norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps, dtype=dtype)
        self.layers = ModuleList(DebertaLayer(cfg, rng=rng, dtype=dtype) for _ in range(cfg.n_layer))
        if cfg.emd_layers:  # absolute positions for the enhanced mask decoder's query stream
            self.emd_position_embeddings = Embedding(cfg.max_position, cfg.d_model, rng=rng, dtype=dtype)
        self.mlm_head = MLMHead(cfg.d_model, cfg.vocab_size, layer_norm_eps=cfg.layer_norm_eps, rng=rng, dtype=dtype)

    def _check_inputs(self, op: str, ids: object, token_type_ids: object, mlm_labels: object,
                      decoder: bool = True) -> None:
        """decoder=False: the body alone (``encode``), which reads no EMD position table."""
        cfg = self.cfg
        limit = cfg.block_size if decoder or cfg.position_biased_input else None
        check_int(op, "ids", ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"{op}: argument 'ids' expected shape (B, T) with B >= 1 and T >= 1, got {ids.shape}")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"{op}: argument 'ids' expected values in [0, {cfg.vocab_size}), got values in "
                             f"[{ids.min()}, {ids.max()}]")
        if limit is not None and ids.shape[1] > limit:
            raise ValueError(f"{op}: argument 'ids' expected at most {limit} positions (the position "
                             f"table's), got {ids.shape[1]}")
        if token_type_ids is not None:
            if not cfg.type_vocab_size:
                raise ValueError(f"{op}: argument 'token_type_ids' expected None (this model has no token-type "
                                 "embeddings), got an array")
            check_int(op, "token_type_ids", token_type_ids)
            check_shape(op, "token_type_ids", token_type_ids, ids.shape)
            if token_type_ids.min() < 0 or token_type_ids.max() >= cfg.type_vocab_size:
                raise ValueError(f"{op}: argument 'token_type_ids' expected values in [0, {cfg.type_vocab_size}), "
                                 f"got values in [{token_type_ids.min()}, {token_type_ids.max()}]")
        if mlm_labels is not None:
            check_mlm_labels(op, ids, mlm_labels, cfg.vocab_size)

    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
                attention_mask: Optional[np.ndarray] = None,
                mlm_labels: Optional[np.ndarray] = None) -> Tuple[DebertaOutputs, Optional[float]]:
        """ids (B, T) -> (DebertaOutputs(mlm_logits (B, T, V)), loss or None).

        token_type_ids (B, T) in [0, type_vocab_size) (default 0, where the model has types);
        attention_mask (B, T) of 1 for a token and 0 for padding (default all 1; every row needs
        a token); mlm_labels (B, T) in [0, V) or -100 where not masked. The loss is the mean
        cross entropy over the masked tokens. With ``emd_layers`` the MLM head reads the enhanced mask
        decoder's output instead of the last layer's (see the module's docstring).
        """
        op = "Deberta.forward"
        self._check_inputs(op, ids, token_type_ids, mlm_labels)
        x, body = self._body(op, ids, token_type_ids, attention_mask)  # (B, T, D)
        if self.cfg.emd_layers:
            x = self._emd(body)  # the ordinary output x is not read any further
        mlm_logits = self.mlm_head.forward(x, self.embeddings.word_embeddings.weight.data)  # tied decoder
        loss, mlm_cache = None, None
        if mlm_labels is not None:
            mlm_loss, mlm_cache = cross_entropy_forward(mlm_logits, mlm_labels)
            loss = float(mlm_loss)
        self.save_cache(DebertaCache(mlm_loss=mlm_cache))
        return DebertaOutputs(mlm_logits=mlm_logits), loss

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss, walking the layers in reverse."""
        cache = peek_forward_cache(self, "Deberta.backward")
        if cache.mlm_loss is None:
            raise RuntimeError("Deberta.backward: the matching forward had no labels, so there is no loss to "
                               "differentiate")
        self.pop_cache()
        one = np.asarray(1.0, self.mlm_head.bias.data.dtype)
        dmlm_logits = cross_entropy_backward(one, cache.mlm_loss)  # (B, T, V)
        self.record("dmlm_logits", dmlm_logits)
        dx, dW_word = self.mlm_head.backward(dmlm_logits)
        self.embeddings.word_embeddings.weight.grad += dW_word  # tied: the decoder's gradient joins the table's
        if not self.cfg.emd_layers:
            self._body_backward(dx)
            return
        dlast_input, drel = self._emd_backward(dx)
        self._body_backward(np.zeros_like(dx), dlast_input, drel)  # the ordinary output is off the loss's path

    def _emd(self, body: DebertaBody) -> np.ndarray:
        """The enhanced mask decoder: I = H + P, then I = last_layer(H, query_states=I), emd_layers times."""
        B, T, _ = body.last_input.shape
        P = self.emd_position_embeddings.forward(np.broadcast_to(np.arange(T), (B, T)))  # (B, T, D)
        query = body.last_input + P
        last = self.layers[-1]  # its weights again; each call keeps its own cache
        for _ in range(self.cfg.emd_layers):
            query = last.forward(body.last_input, body.rel, body.visible, body.c2p_index, body.p2c_index,
                                 query_states=query)
        return query

    def _emd_backward(self, dquery: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """dquery (B, T, D) of the decoder's output -> (dH (B, T, D), drel (2 S, D)): the last layer's decoder
        calls in reverse (their parameters' shares added up by the layer), then I = H + P."""
        last = self.layers[-1]
        dH = np.zeros_like(dquery)  # H is every call's keys and values
        drel = np.zeros_like(self.rel_embeddings.weight.data)
        for _ in range(self.cfg.emd_layers):
            dH_call, drel_call, dquery = last.backward(dquery)
            dH += dH_call
            drel += drel_call
        self.emd_position_embeddings.backward(dquery)  # I = H + P: both get dI
        self.record("emd.dquery", dquery)
        return dH + dquery, drel

    def _body(self, op: str, ids: np.ndarray, token_type_ids: Optional[np.ndarray],
              attention_mask: Optional[np.ndarray]) -> Tuple[np.ndarray, DebertaBody]:
        """Embeddings, then the layers over the shared relative table: ids (B, T) -> (x (B, T, D), what the
        layers read)."""
        cfg = self.cfg
        pad = key_padding_mask(op, attention_mask, ids.shape)  # (B, T) True at padding
        T = ids.shape[1]
        visible = None if pad is None else pairwise_attention_mask(~pad)  # (B, 1, T, T)
        c2p_index, p2c_index = deberta_relative_indices(  # (T, T) each, (DA.3)
            T, T, position_buckets=cfg.position_buckets, max_relative_positions=cfg.max_relative_positions)
        x = self.embeddings.forward(ids, token_type_ids, pad)  # (B, T, D)
        rel = self.rel_embeddings.weight.data  # (2 S, D), shared by every layer
        if cfg.norm_rel_ebd:
            rel = self.rel_norm.forward(rel)
        last_input = x
        for layer in self.layers:
            last_input = x
            x = layer.forward(x, rel, visible, c2p_index, p2c_index)
        return x, DebertaBody(last_input=last_input, rel=rel, visible=visible, c2p_index=c2p_index,
                              p2c_index=p2c_index)

    def _body_backward(self, dx: np.ndarray, dlast_input: Optional[np.ndarray] = None,
                       drel: Optional[np.ndarray] = None) -> None:
        """dx (B, T, D) into the layers in reverse, the shared relative table (every layer's share added up,
        then its norm) and the embeddings. The decoder's shares join in: dlast_input (B, T, D) at the last
        layer's input, drel (2 S, D) at the table."""
        if drel is None:
            drel = np.zeros_like(self.rel_embeddings.weight.data)  # (2 S, D)
        for i in reversed(range(len(self.layers))):
            dx, drel_layer, _ = self.layers[i].backward(dx)
            drel += drel_layer
            if i == len(self.layers) - 1 and dlast_input is not None:
                dx = dx + dlast_input  # H: the ordinary call's input and the decoder's keys, values and I
        self.record("drel", drel)
        if self.cfg.norm_rel_ebd:
            drel = self.rel_norm.backward(drel)
        self.rel_embeddings.weight.grad += drel
        self.record("rel_embeddings.dW", drel)
        self.embeddings.backward(dx)

    # -- the body alone, for fine-tuning (npformer.finetune) ----------------------------------------
    @atomic
    def encode(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
               attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """ids (B, T) -> hidden (B, T, D): embeddings and the layers over the shared relative table, no MLM head.

        Arguments as ``forward``'s; ``backward_encode(dhidden)`` is its backward. The enhanced mask
        decoder (``emd_layers``) is not run: it decodes masked tokens in pre-training, and a fine-tuning
        head reads the last layer's ordinary output (its position table gets no gradient here).
        """
        op = "Deberta.encode"
        self._check_inputs(op, ids, token_type_ids, None, decoder=False)
        x, _ = self._body(op, ids, token_type_ids, attention_mask)
        self.save_cache(EncodeCache(out_shape=x.shape))
        return x

    @atomic
    def backward_encode(self, dhidden: np.ndarray) -> None:
        """dhidden (B, T, D) of the latest unmatched ``encode``: the body's gradients, the layers in reverse."""
        pop_encode_cache(self, "Deberta.backward_encode", dhidden, self.cfg.d_model,
                         self.embeddings.LayerNorm.weight.data.dtype)
        self._body_backward(dhidden)

    def astype(self, dtype) -> "Deberta":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.mlm_head.bias.data.dtype.name)
        return self
