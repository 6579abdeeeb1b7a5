"""ELECTRA: a small masked-LM generator and a discriminator that spots the tokens it replaced.

Both are BERT-style encoders (``nn.encoder``'s embeddings and post-norm layers). Their
embeddings may be narrower than the hidden width (``embedding_size`` E != ``d_model`` D):
then a linear map ``embeddings_project`` E -> D follows them, in each model.

- ``ElectraGenerator`` (Hugging Face's ElectraForMaskedLM): the encoder, then the generator
  head ``generator_predictions`` = dense D -> E, GELU, LayerNorm, and the decoder tied to the
  word table (V, E) plus a bias. Loss: mean cross entropy over the masked tokens.
- ``ElectraDiscriminator`` (ElectraForPreTraining): the encoder, then
  ``discriminator_predictions`` = dense D -> D, GELU, ``dense_prediction`` D -> 1: one logit
  per token, positive for "replaced". Loss: binary cross entropy with logits, averaged over
  the tokens the attention mask keeps (all when there is no mask).
- ``ElectraPretraining``: the pair, sharing ONE embeddings module (the discriminator's; the
  generator's is the same object), trained on replaced-token detection. The generator's
  MLM logits at the masked positions are sampled (with a given numpy Generator) to corrupt
  the input; the discriminator labels each token 1 where the sample differs from the
  original. Loss = MLM(generator) + lambda * BCE(discriminator), lambda = 50 as in the
  paper. The samples are not differentiated through: the generator learns from its MLM
  loss alone, the shared embeddings from both.

Binary cross entropy with logits z and labels y over N counted tokens:
    loss = (1/N) sum [max(z, 0) - z y + log(1 + exp(-|z|))]    (= -y log s - (1 - y) log(1 - s), s = sigmoid(z))
    dloss/dz = (sigmoid(z) - y) / N, and 0 at tokens not counted.

Parameter names: ``embeddings.*`` (as BERT's), ``embeddings_project.*`` (E != D only),
``layers.{i}.*`` (as BERT's), ``generator_predictions.{dense,layer_norm}.*``,
``generator_predictions.bias``; ``discriminator_predictions.{dense,dense_prediction}.*``.
In ``ElectraPretraining``: ``discriminator.*`` and ``generator.*`` (the shared embeddings
once, as ``discriminator.embeddings.*``).

Shapes: ids (B, T) int, hidden (B, T, D), mlm_logits (B, T, V), rtd_logits (B, T).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..nn.encoder import (EncoderEmbeddings, MLMHead, PostNormEncoderLayer, check_encoder_config, check_mlm_labels,
                          key_padding_mask)
from ..nn.heads import EncodeCache, peek_forward_cache, pop_encode_cache
from ..nn.layers import Dropout, Linear, check_features
from ..nn.lm import IGNORE_INDEX
from ..nn.module import Module, ModuleList, atomic
from ..ops._checks import check_count, check_float, check_int, check_ndim, check_real, check_shape
from ..ops.activations import gelu_backward, gelu_forward
from ..ops.cross_entropy import cross_entropy_backward, cross_entropy_forward

__all__ = ["ElectraConfig", "ElectraGenerator", "ElectraDiscriminator", "ElectraPretraining",
           "ElectraGeneratorOutputs", "ElectraDiscriminatorOutputs", "ElectraPretrainingOutputs",
           "RTD_WEIGHT", "IGNORE_INDEX", "bce_with_logits_forward", "bce_with_logits_backward", "sample_from_logits"]

RTD_WEIGHT = 50.0  # lambda: the discriminator's loss weight in the paper


@dataclass
class ElectraConfig:
    """A generator's or a discriminator's shape; Hugging Face's field name, where it differs, in the comment."""

    vocab_size: int = 65
    max_position: int = 128  # max_position_embeddings
    type_vocab_size: int = 2  # 0: no token-type table
    embedding_size: int = 128  # E: the tables' width (== d_model: no embeddings_project)
    n_layer: int = 2  # num_hidden_layers
    n_head: int = 4  # num_attention_heads
    d_model: int = 128  # hidden_size
    d_ff: int = 512  # intermediate_size
    dropout: float = 0.1  # hidden_dropout_prob
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0  # the word row a lookup never trains; None: none
    dtype: str = "float32"

    def __post_init__(self) -> None:
        op = "ElectraConfig"
        check_encoder_config(op, self, ("embedding_size",))  # the fields every encoder has

    @property
    def block_size(self) -> int:
        return self.max_position

    def to_dict(self) -> dict:
        return asdict(self)


# -- binary cross entropy with logits ----------------------------------------------------------------
class BCECache(NamedTuple):
    s: np.ndarray  # (B, T) sigmoid(z)
    y: np.ndarray  # (B, T) labels as floats
    counted: np.ndarray  # (B, T) bool: tokens in the mean
    n: int  # N: how many are counted


def bce_with_logits_forward(z: np.ndarray, y: np.ndarray, counted: np.ndarray) -> Tuple[float, BCECache]:
    """Mean over counted tokens of max(z, 0) - z y + log(1 + exp(-|z|)); z (B, T) float, y (B, T) in {0, 1}."""
    yf = y.astype(z.dtype)
    per_token = np.maximum(z, 0) - z * yf + np.log1p(np.exp(-np.abs(z)))  # stable softplus(z) - z y
    n = int(counted.sum())
    loss = float(per_token[counted].sum() / max(n, 1))
    s = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid(z), without overflow
    return loss, BCECache(s=s, y=yf, counted=counted, n=n)


def bce_with_logits_backward(dloss: float, cache: BCECache) -> np.ndarray:
    """dz = dloss * (sigmoid(z) - y) / N at counted tokens, 0 elsewhere."""
    dz = (cache.s - cache.y) * cache.s.dtype.type(dloss / max(cache.n, 1))
    return np.where(cache.counted, dz, 0).astype(cache.s.dtype)


# -- the shared encoder part ---------------------------------------------------------------------------
class _ElectraEncoder(Module):
    """embeddings (E) -> [embeddings_project E -> D] -> layers: what the generator and discriminator share."""

    def __init__(self, cfg: ElectraConfig, seed: int, name: str):
        super().__init__()
        if not isinstance(cfg, ElectraConfig):
            raise TypeError(f"{name}: argument 'cfg' expected an ElectraConfig, got {type(cfg).__name__}")
        check_count(name, "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)
        dtype = np.dtype(cfg.dtype)
        E, D = cfg.embedding_size, cfg.d_model
        self.embeddings = EncoderEmbeddings(
            cfg.vocab_size, cfg.max_position, E, type_vocab_size=cfg.type_vocab_size, pad_token_id=cfg.pad_token_id,
            layer_norm_eps=cfg.layer_norm_eps, dropout=cfg.dropout, rng=rng, dtype=dtype)
        if E != D:
            self.embeddings_project = Linear(E, D, True, rng=rng, dtype=dtype)
        self.layers = ModuleList(
            PostNormEncoderLayer(D, cfg.n_head, cfg.d_ff, dropout=cfg.dropout, layer_norm_eps=cfg.layer_norm_eps,
                                 rng=rng, dtype=dtype)
            for _ in range(cfg.n_layer))

    @property
    def projects(self) -> bool:
        return self.cfg.embedding_size != self.cfg.d_model

    def _check(self, op: str, ids, token_type_ids, attention_mask) -> Optional[np.ndarray]:
        self.embeddings.check_inputs(op, ids, token_type_ids)
        return key_padding_mask(op, attention_mask, ids.shape)  # (B, T) True at padding

    def _encode(self, ids, token_type_ids, pad) -> np.ndarray:
        """ids (B, T) -> hidden (B, T, D)."""
        x = self.embeddings.forward(ids, token_type_ids)  # (B, T, E)
        if self.projects:
            x = self.embeddings_project.forward(x)  # (B, T, D)
        for layer in self.layers:
            x = layer.forward(x, key_padding_mask=pad)
        return x

    def _encode_backward(self, dx: np.ndarray) -> None:
        """dhidden (B, T, D) -> the encoder's gradients, the layers walked in reverse."""
        for layer in reversed(self.layers):
            dx = layer.backward(dx)
        if self.projects:
            dx = self.embeddings_project.backward(dx)  # (B, T, E)
        self.embeddings.backward(dx)

    # -- the body alone, for fine-tuning (npformer.finetune) ----------------------------------------
    @atomic
    def encode(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
               attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """ids (B, T) -> hidden (B, T, D): the encoder without its head; ``backward_encode`` is its backward."""
        op = f"{type(self).__name__}.encode"
        pad = self._check(op, ids, token_type_ids, attention_mask)
        x = self._encode(ids, token_type_ids, pad)  # (B, T, D)
        self.save_cache(EncodeCache(out_shape=x.shape))
        return x

    @atomic
    def backward_encode(self, dhidden: np.ndarray) -> None:
        """dhidden (B, T, D) of the latest unmatched ``encode``: the encoder's gradients, the layers in reverse."""
        pop_encode_cache(self, f"{type(self).__name__}.backward_encode", dhidden, self.cfg.d_model,
                         self.embeddings.LayerNorm.weight.data.dtype)
        self._encode_backward(dhidden)

    def astype(self, dtype):
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.embeddings.LayerNorm.weight.data.dtype.name)
        return self


# -- the generator ---------------------------------------------------------------------------------------
class ElectraGeneratorOutputs(NamedTuple):
    mlm_logits: np.ndarray  # (B, T, V)


class ElectraGenerator(_ElectraEncoder):
    """The encoder, then generator_predictions (dense D -> E, GELU, LayerNorm, tied decoder + bias)."""

    def __init__(self, cfg: ElectraConfig, seed: int = 0):
        super().__init__(cfg, seed, "ElectraGenerator")
        self.generator_predictions = MLMHead(cfg.d_model, cfg.vocab_size, cfg.embedding_size,
                                             layer_norm_eps=cfg.layer_norm_eps, rng=self.rng, dtype=np.dtype(cfg.dtype))

    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
                attention_mask: Optional[np.ndarray] = None,
                mlm_labels: Optional[np.ndarray] = None) -> Tuple[ElectraGeneratorOutputs, Optional[float]]:
        """ids (B, T) -> (ElectraGeneratorOutputs(mlm_logits (B, T, V)), mean masked-token cross entropy or None)."""
        op = "ElectraGenerator.forward"
        pad = self._check(op, ids, token_type_ids, attention_mask)
        if mlm_labels is not None:
            check_mlm_labels(op, ids, mlm_labels, self.cfg.vocab_size)
        x = self._encode(ids, token_type_ids, pad)  # (B, T, D)
        mlm_logits = self.generator_predictions.forward(x, self.embeddings.word_embeddings.weight.data)
        loss, cache = None, None
        if mlm_labels is not None:
            mlm_loss, cache = cross_entropy_forward(mlm_logits, mlm_labels)
            loss = float(mlm_loss)
        self.save_cache(cache)
        return ElectraGeneratorOutputs(mlm_logits=mlm_logits), loss

    @atomic
    def backward(self, dloss: float = 1.0) -> None:
        """Add every parameter's gradient of dloss * (the latest unmatched forward's loss)."""
        check_real("ElectraGenerator.backward", "dloss", dloss)
        if peek_forward_cache(self, "ElectraGenerator.backward") is None:
            raise RuntimeError("ElectraGenerator.backward: the matching forward had no labels, so there is no "
                               "loss to differentiate")
        cache = self.pop_cache()
        dmlm_logits = cross_entropy_backward(np.asarray(dloss, self.generator_predictions.bias.data.dtype), cache)
        self.record("dmlm_logits", dmlm_logits)
        dx, dW_word = self.generator_predictions.backward(dmlm_logits)
        self.embeddings.word_embeddings.weight.grad += dW_word  # tied decoder: its gradient joins the table's
        self._encode_backward(dx)


# -- the discriminator -----------------------------------------------------------------------------------
class DiscriminatorHeadCache(NamedTuple):
    act: object  # GeluCache
    in_shape: Tuple[int, ...]  # (B, T, D)


class ElectraDiscriminatorHead(Module):
    """rtd_logits = dense_prediction(gelu(dense(h))): (B, T, D) -> (B, T), one logit per token."""

    def __init__(self, d_model: int, *, rng: np.random.Generator, dtype=np.float32):
        super().__init__()
        self.dense = Linear(d_model, d_model, True, rng=rng, dtype=dtype)
        self.dense_prediction = Linear(d_model, 1, True, rng=rng, dtype=dtype)

    @atomic
    def forward(self, h: np.ndarray) -> np.ndarray:
        """h (B, T, D) -> rtd_logits (B, T)."""
        op, weight = "ElectraDiscriminatorHead.forward", self.dense.weight
        check_float(op, "h", h)
        check_ndim(op, "h", h, 3)
        check_features(op, "h", h, weight.shape[1], weight.data.dtype)
        g, act = gelu_forward(self.dense.forward(h), approximate="none")  # the exact (erf) GELU
        self.record("act", g)
        logits = self.dense_prediction.forward(g)[..., 0]  # (B, T)
        self.save_cache(DiscriminatorHeadCache(act=act, in_shape=h.shape))
        self.record("logits", logits)
        return logits

    @atomic
    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        """dlogits (B, T) -> dh (B, T, D)."""
        op = "ElectraDiscriminatorHead.backward"
        check_float(op, "dlogits", dlogits)
        check_shape(op, "dlogits", dlogits, self.peek_cache().in_shape[:-1])
        if dlogits.dtype != self.dense.weight.data.dtype:
            raise ValueError(f"{op}: argument 'dlogits' expected dtype {self.dense.weight.data.dtype} (the "
                             f"parameters'), got {dlogits.dtype}")
        cache = self.pop_cache()
        dg = self.dense_prediction.backward(dlogits[..., None])  # (B, T, D)
        return self.dense.backward(gelu_backward(dg, cache.act))


class ElectraDiscriminatorOutputs(NamedTuple):
    rtd_logits: np.ndarray  # (B, T): > 0 means "replaced"


class ElectraDiscriminator(_ElectraEncoder):
    """The encoder, then discriminator_predictions: a logit per token for "this token was replaced"."""

    def __init__(self, cfg: ElectraConfig, seed: int = 0):
        super().__init__(cfg, seed, "ElectraDiscriminator")
        self.discriminator_predictions = ElectraDiscriminatorHead(cfg.d_model, rng=self.rng,
                                                                  dtype=np.dtype(cfg.dtype))

    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
                attention_mask: Optional[np.ndarray] = None,
                labels: Optional[np.ndarray] = None) -> Tuple[ElectraDiscriminatorOutputs, Optional[float]]:
        """ids (B, T) -> (ElectraDiscriminatorOutputs(rtd_logits (B, T)), BCE or None).

        labels (B, T) in {0 (original), 1 (replaced)}; the loss averages over the tokens the
        attention mask keeps (Hugging Face's ElectraForPreTraining).
        """
        op = "ElectraDiscriminator.forward"
        pad = self._check(op, ids, token_type_ids, attention_mask)
        if labels is not None:
            check_int(op, "labels", labels)
            check_shape(op, "labels", labels, ids.shape)
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"{op}: argument 'labels' expected values 0 (original) or 1 (replaced), "
                                 f"got {labels[~np.isin(labels, (0, 1))].flat[0]}")
        x = self._encode(ids, token_type_ids, pad)  # (B, T, D)
        rtd_logits = self.discriminator_predictions.forward(x)  # (B, T)
        loss, cache = None, None
        if labels is not None:
            counted = np.ones(ids.shape, bool) if pad is None else ~pad
            loss, cache = bce_with_logits_forward(rtd_logits, labels, counted)
        self.save_cache(cache)
        return ElectraDiscriminatorOutputs(rtd_logits=rtd_logits), loss

    @atomic
    def backward(self, dloss: float = 1.0) -> None:
        """Add every parameter's gradient of dloss * (the latest unmatched forward's loss)."""
        check_real("ElectraDiscriminator.backward", "dloss", dloss)
        if peek_forward_cache(self, "ElectraDiscriminator.backward") is None:
            raise RuntimeError("ElectraDiscriminator.backward: the matching forward had no labels, so there is no "
                               "loss to differentiate")
        cache = self.pop_cache()
        drtd_logits = bce_with_logits_backward(dloss, cache)  # (sigmoid(z) - y) / N, times dloss
        self.record("drtd_logits", drtd_logits)
        dx = self.discriminator_predictions.backward(drtd_logits)
        self._encode_backward(dx)


# -- the pair --------------------------------------------------------------------------------------------
class ElectraPretrainingOutputs(NamedTuple):
    mlm_logits: np.ndarray  # (B, T, V) the generator's
    rtd_logits: np.ndarray  # (B, T) the discriminator's, on the corrupted ids
    corrupted_ids: np.ndarray  # (B, T) ids with the masked positions replaced by the generator's samples
    rtd_labels: np.ndarray  # (B, T) 1 where the corrupted id differs from the original


@dataclass
class ElectraPretrainingConfig:
    """The pair's two configs and the discriminator loss weight: what ``npformer train --model electra`` saves."""

    generator: ElectraConfig
    discriminator: ElectraConfig
    rtd_weight: float = RTD_WEIGHT

    def __post_init__(self) -> None:
        op = "ElectraPretrainingConfig"
        for name in ("generator", "discriminator"):  # from a checkpoint, each comes as the dict to_dict gave
            value = getattr(self, name)
            if isinstance(value, dict):
                value = ElectraConfig(**value)
            if not isinstance(value, ElectraConfig):
                raise TypeError(f"{op}: argument '{name}' expected an ElectraConfig or its dict, got "
                                f"{type(value).__name__}")
            setattr(self, name, value)
        self.rtd_weight = check_real(op, "rtd_weight", self.rtd_weight, lo=0.0)

    @property
    def vocab_size(self) -> int:
        return self.discriminator.vocab_size

    @property
    def dtype(self) -> str:
        return self.discriminator.dtype

    def to_dict(self) -> dict:
        return {"generator": asdict(self.generator), "discriminator": asdict(self.discriminator),
                "rtd_weight": self.rtd_weight}


class ElectraPretraining(Module):
    """A generator and a discriminator sharing one embeddings module, trained on replaced-token detection.

    Made from both configs, or from one ``ElectraPretrainingConfig`` (``ElectraPretraining(cfg, seed=...)``).
    ``rng`` draws the generator's samples when ``forward`` is given none (a trainer saves its state).
    """

    def __init__(self, generator_cfg, discriminator_cfg: Optional[ElectraConfig] = None, seed: int = 0,
                 rtd_weight: float = RTD_WEIGHT):
        super().__init__()
        op = "ElectraPretraining"
        if isinstance(generator_cfg, ElectraPretrainingConfig) and discriminator_cfg is None:
            generator_cfg, discriminator_cfg, rtd_weight = (generator_cfg.generator, generator_cfg.discriminator,
                                                            generator_cfg.rtd_weight)
        for name, cfg in (("generator_cfg", generator_cfg), ("discriminator_cfg", discriminator_cfg)):
            if not isinstance(cfg, ElectraConfig):
                raise TypeError(f"{op}: argument '{name}' expected an ElectraConfig, got {type(cfg).__name__}")
        for field in ("vocab_size", "max_position", "type_vocab_size", "embedding_size", "layer_norm_eps",
                      "pad_token_id", "dropout", "dtype"):
            if getattr(generator_cfg, field) != getattr(discriminator_cfg, field):
                raise ValueError(f"{op}: argument 'generator_cfg' expected {field} = "
                                 f"{getattr(discriminator_cfg, field)!r} (the discriminator's: the embeddings are "
                                 f"shared), got {getattr(generator_cfg, field)!r}")
        check_count(op, "seed", seed, 0)
        self.rtd_weight = check_real(op, "rtd_weight", rtd_weight, lo=0.0)
        self.discriminator = ElectraDiscriminator(discriminator_cfg, seed)
        self.generator = ElectraGenerator(generator_cfg, seed + 1)
        self.generator.embeddings = self.discriminator.embeddings  # ONE table set: both add their gradients
        self.cfg = ElectraPretrainingConfig(generator_cfg, discriminator_cfg, self.rtd_weight)
        # One stream for the generator's samples and every dropout mask of both models, so that a trainer that
        # saves model.rng saves all the randomness a step draws (a resumed run then draws the same masks).
        self.rng = np.random.default_rng(seed + 2)
        for module in (self.discriminator, self.generator):
            module.rng = self.rng
        for _, module in self.named_modules():
            if isinstance(module, Dropout):
                module.rng = self.rng

    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
                attention_mask: Optional[np.ndarray] = None, mlm_labels: Optional[np.ndarray] = None, *,
                rng: Optional[np.random.Generator] = None) -> Tuple[ElectraPretrainingOutputs, float]:
        """ids (B, T) with masked positions (e.g. [MASK]), mlm_labels (B, T) the original token there, -100 elsewhere
        (required: they say which positions the generator fills).

        The generator predicts the masked tokens; one sample per masked position from
        softmax(mlm_logits) (drawn with ``rng``) replaces it; the discriminator reads the result.
        Returns (outputs, MLM + rtd_weight * BCE).
        """
        op = "ElectraPretraining.forward"
        self.discriminator._check(op, ids, token_type_ids, attention_mask)
        if mlm_labels is None:
            raise ValueError(f"{op}: argument 'mlm_labels' expected the masked positions' tokens, got None")
        check_mlm_labels(op, ids, mlm_labels, self.generator.cfg.vocab_size)
        rng = self.rng if rng is None else rng
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"{op}: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")

        gen, mlm_loss = self.generator.forward(ids, token_type_ids, attention_mask, mlm_labels)
        masked = mlm_labels != IGNORE_INDEX  # (B, T)
        original = np.where(masked, mlm_labels, ids)  # (B, T) the uncorrupted sequence
        corrupted = ids.copy()
        corrupted[masked] = sample_from_logits(gen.mlm_logits[masked], rng)  # not differentiated through
        rtd_labels = (corrupted != original).astype(np.int64)
        disc, rtd_loss = self.discriminator.forward(corrupted, token_type_ids, attention_mask, rtd_labels)
        self.save_cache(True)
        loss = mlm_loss + self.rtd_weight * rtd_loss
        return ElectraPretrainingOutputs(gen.mlm_logits, disc.rtd_logits, corrupted, rtd_labels), loss

    @atomic
    def backward(self) -> None:
        """The discriminator's part (weighted by rtd_weight), then the generator's; the embeddings get both."""
        self.pop_cache()
        self.discriminator.backward(self.rtd_weight)  # its forward ran last: its caches are on top
        self.generator.backward(1.0)

    # -- the discriminator's body, for fine-tuning (npformer.finetune), as the paper fine-tunes it ----------
    @atomic
    def encode(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
               attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """ids (B, T) -> hidden (B, T, D) of the discriminator's encoder (``ElectraDiscriminator.encode``)."""
        return self.discriminator.encode(ids, token_type_ids, attention_mask)

    @atomic
    def backward_encode(self, dhidden: np.ndarray) -> None:
        """The backward of ``encode``: the discriminator's encoder (and the shared embeddings) get the gradients."""
        self.discriminator.backward_encode(dhidden)

    def astype(self, dtype) -> "ElectraPretraining":
        """Convert every parameter (the shared embeddings once) to float32 or float64; the configs follow."""
        super().astype(dtype)
        name = self.discriminator.embeddings.LayerNorm.weight.data.dtype.name
        for model in (self.discriminator, self.generator):
            model.cfg = replace(model.cfg, dtype=name)
        self.cfg = ElectraPretrainingConfig(self.generator.cfg, self.discriminator.cfg, self.rtd_weight)
        return self


def sample_from_logits(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of softmax(logits): (M, V) -> (M,) int64, by the inverse of each row's CDF."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(z.shape[0]) * cdf[:, -1]  # uniform on [0, total)
    return np.minimum((cdf <= u[:, None]).sum(axis=-1), z.shape[-1] - 1).astype(np.int64)
