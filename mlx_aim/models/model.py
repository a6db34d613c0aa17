"""AIM and AIMv2 models: AIM's classifier (trunk + its released attentive probe), its trunk alone and its
pre-training model (trunk + pixel head); AIMv2's vision encoder, and an encoder composed with a probe trained here;
the AIMv2-LiT; their one constructor `build_model` (initialisation, dtype, quantization) and the quantization
policy.

The contract, as Apple's code answers (apple/ml-aim, `aim-v1/aim/v1/torch/models.py` and
`aim-v2/aim/v2/torch/models.py`): `model(images)` of AIM's classifier gives its probe's logits; of an AIMv2 encoder
the final normalised tokens (B, N, D), as transformers' `Aimv2VisionModel` gives `last_hidden_state`. A head is
composed onto a trunk (`with_probe`, `load(..., head=...)`), never hidden inside one: a model without a trained head
raises `UntrainedHeadError` where an answer would need one, naming the command that trains it.

Input layout: NHWC float images, (batch, height, width, channels), normalised as in `mlx_aim.data`.
NHWC is MLX's native convolution layout; NCHW input is rejected with an error that says how to transpose.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backend import Linear
from .config import PRESET_NAMES, AIMConfig, AIMv2Config, AIMv2LiTConfig, Config
from .layers import (
    AttentionPoolHead, AttentionProbe, PixelHead, Preprocessor, TextPreprocessor, Trunk, aim_block, aimv2_block,
    attention_mask, layer_norm, rms_norm,
)


def check_images(images, config: Config) -> mx.array:
    """Validates a batch of NHWC images against the config; returns it as an mx.array."""
    if not isinstance(images, mx.array):
        images = mx.array(images)
    C, p = config.num_channels, config.patch_size
    if images.ndim != 4:
        raise ValueError(
            f"images: expected a 4-D NHWC batch (batch, height, width, {C}), got shape {tuple(images.shape)}"
        )
    if not mx.issubdtype(images.dtype, mx.floating):
        raise ValueError(
            f"images: expected a floating-point dtype (normalised pixels), got {images.dtype}; "
            "use mlx_aim.data.eval_transform to turn uint8 pixels into model input"
        )
    B, H, W, channels = images.shape
    if channels != C:
        hint = ""
        if images.shape[1] == C:
            hint = "; this looks like NCHW: mlx-aim takes NHWC, use images.transpose(0, 2, 3, 1)"
        raise ValueError(f"images: expected {C} channels last (NHWC), got shape {tuple(images.shape)}{hint}")
    if H % p or W % p:
        raise ValueError(f"images: height and width must be multiples of the patch size {p}, got {H}x{W}")
    return images


def check_image_size(images: mx.array, config: AIMv2Config) -> None:
    """An AIMv2 model's size rule: a fixed-size checkpoint takes its own size only (its learned position
    embedding has one grid); native resolution takes any grid of at most `max_patches` patches."""
    H, W = images.shape[1:3]
    p = config.patch_size
    if not config.native and (H, W) != (config.image_size, config.image_size):
        raise ValueError(
            f"images: {config.name or 'this model'} takes {config.image_size}x{config.image_size} images (its learned "
            f"position embedding covers a {config.grid_size}x{config.grid_size} grid), got {H}x{W}; resize or crop "
            f"them to {config.image_size}x{config.image_size}"
        )
    if config.native and (H // p) * (W // p) > config.max_patches:
        raise ValueError(
            f"images: {H}x{W} is {H // p}x{W // p} = {(H // p) * (W // p)} patches, over max_patches="
            f"{config.max_patches}; downscale the images or raise the limit (config.replace(max_patches=...))"
        )


def _check_max_block_id(max_block_id: Optional[int], depth: int) -> Optional[int]:
    """`max_block_id` as a non-negative block index (negative ones count from the end); None stays None."""
    if max_block_id is None:
        return None
    if not -depth <= max_block_id < depth:
        raise ValueError(f"max_block_id={max_block_id}: expected a block index below {depth}")
    return max_block_id + depth if max_block_id < 0 else max_block_id


# ---------------------------------------------------------------------------------------------------
# A trunk without a trained head


class UntrainedHeadError(ValueError):
    """A call whose answer needs a trained head, on a model that has none (an AIMv2 encoder: Apple released no
    AIMv2 heads; an AIM trunk without `head.*` weights). Its message names the command that trains one."""


PROBE_COMMAND = "mlx-aim probe train --model {src} --data DIR --out OUT"


def untrained_head_message(config: Config, source: str = "", wanted: str = "classes", hint: str = "") -> str:
    """Why a model without a trained head gives no `wanted` (classes, logits, a pooled embedding), and how to give
    it one: `PROBE_COMMAND`, then the head file on the trunk (`--head`, `load(..., head=...)`) or the model folder
    the probe writes. `source`: the model as the user named it (default: the config's name); `hint`: what the model
    does give."""
    name = source or config.name or "the model"
    src = source or (config.name if config.name in PRESET_NAMES else "SRC")  # a name `load` takes, else a placeholder
    why = ("Apple released no AIMv2 heads" if isinstance(config, AIMv2Config) else
           "a trunk without head.* weights, e.g. a pre-training export or a random init")
    return (f"{name} has no trained classification head ({why}), so it gives no {wanted}"
            + (f" ({hint})" if hint else "")
            + f". Train an attentive probe on your labelled images: `{PROBE_COMMAND.format(src=src)}`, then "
            f"classify with `--head OUT/head.safetensors` or `--model OUT/model` (in Python: "
            f"`mlx_aim.load({src!r}, head='OUT/head.safetensors')`)")


# ---------------------------------------------------------------------------------------------------
# Encoders and probed encoders


class _Encoder(nn.Module):
    """What every model has: a preprocessor and a trunk with Apple's parameter names, its dtype, and the probe's
    input (`probe_features`), which a trunk computes whether or not a probe reads it. `trunk_options` are what the
    model's `extract_features` takes beyond the images and `max_block_id` (AIM: `attention`)."""

    config: Config
    preprocessor: Preprocessor
    trunk: Trunk

    @property
    def dtype(self) -> mx.Dtype:
        return self.trunk.post_trunk_norm.weight.dtype

    def probe_features(self, images: mx.array, **trunk_options) -> mx.array:
        """The probe's input: the mean of the probe layers' raw outputs, (B, N, D)."""
        _, features = self.extract_features(images, self.config.max_block_id, **trunk_options)
        return mx.stack([features[i] for i in self.config.probe_layers]).mean(axis=0)

    def _no_head(self, wanted: str, hint: str) -> UntrainedHeadError:
        return UntrainedHeadError(untrained_head_message(self.config, wanted=wanted, hint=hint))


def probe_eps(config: Config) -> float:
    """The probe BatchNorm's eps of `config`'s family: AIM's is its trunk's LayerNorm eps (Apple's heads); AIMv2's is
    AIM's 1e-6 (its `norm_eps` is the trunk's RMSNorm's)."""
    return 1e-6 if isinstance(config, AIMv2Config) else config.norm_eps


def build_probe(config: Config, num_classes: Optional[int] = None) -> AttentionProbe:
    """A fresh attentive probe for `config`'s trunk (width, heads, the family's eps) with `num_classes` outputs
    (default: the config's), MLX's default initialisation: to train (`mlx_aim.training.probe`) or to load trained
    weights into; compose it with a trunk with `with_probe`."""
    return AttentionProbe(config.width, config.num_heads, num_classes or config.num_classes, probe_eps(config))


class Probed(_Encoder):
    """A trunk composed with a trained attentive probe (AIM section 4), with Apple's parameter names
    (`preprocessor.*`, `trunk.*`, `head.*`): `model(images)` gives the probe's (B, num_classes) logits, `embed` its
    attention-pooled (B, D) descriptor, `probe_features` its (B, N, D) input. `load` gives one for a source with
    `head.*` weights or a `head=` file; `with_probe(trunk, head)` composes one; `build_model(config, probe=True)`
    builds the shapes a trained probe is loaded into."""

    head: AttentionProbe

    def __init__(self, config: Config):
        super().__init__(config)
        self.head = build_probe(config)

    def __call__(self, images: mx.array, **trunk_options) -> mx.array:
        logits, _ = self.head(self.probe_features(images, **trunk_options))
        return logits

    def embed(self, images: mx.array, **trunk_options) -> mx.array:
        """The probe's attention-pooled embedding, (B, D): a global image descriptor for retrieval."""
        _, pooled = self.head(self.probe_features(images, **trunk_options))
        return pooled


class _AIMBase(_Encoder):
    """AIM's preprocessor and trunk, shared by its two models, with Apple's parameter names."""

    def __init__(self, config: AIMConfig):
        super().__init__()
        self.config = config
        c = config
        self.preprocessor = Preprocessor(c.patch_size, c.num_channels, c.width, layer_norm(c.norm_eps))
        self.trunk = Trunk([aim_block(c.width, c.num_heads, c.mlp_ratio, c.norm_eps) for _ in range(c.depth)],
                           layer_norm(c.norm_eps)(c.width))

    def extract_features(
        self,
        images: mx.array,
        max_block_id: Optional[int] = None,
        attention: Optional[str] = None,
        prefix_len: Optional[mx.array] = None,
    ) -> tuple[mx.array, list[mx.array]]:
        """Runs the trunk up to block `max_block_id` (default: all blocks).

        Returns (the last run block's output after the final LayerNorm, the raw (B, N, D) output of every
        run block). `attention` is "bidirectional", "causal" or "prefix" (default: the config's).
        """
        images = check_images(images, self.config)
        max_block_id = _check_max_block_id(max_block_id, self.config.depth)
        x = self.preprocessor(images.astype(self.dtype))
        mask = attention_mask(attention or self.config.attention, x.shape[1], prefix_len)
        return self.trunk(x, mask, max_block_id)


class AIM(Probed, _AIMBase):
    """AIM's classifier, as Apple's `AIM` (apple/ml-aim, `aim-v1/aim/v1/torch/models.py`): the trunk with its trained
    attentive probe; `model(images)` returns ImageNet (or `num_classes`) logits. It, `probe_features` and `embed` take
    `attention=` ("bidirectional" or "causal"; default: the config's)."""


class AIMEncoder(_AIMBase):
    """AIM's preprocessor and trunk without a classification head: a pre-training export, a random initialisation
    (`build_model`), a trunk to probe. Apple's AIM answers `model(images)` with its probe's logits; a trunk alone has
    none to give, so the call (and `embed`) raise `UntrainedHeadError`, naming the command that trains a probe.
    `extract_features` and `probe_features` are what it computes."""

    def __call__(self, images: mx.array, **trunk_options) -> mx.array:
        raise self._no_head("logits", "extract_features(images) gives its features")

    def embed(self, images: mx.array, **trunk_options) -> mx.array:
        raise self._no_head("pooled embedding", "probe_features(images) gives the probe's input")


class _AIMv2Base(_Encoder):
    """AIMv2's preprocessor and trunk, shared by its encoder with our probe and the LiT's image encoder."""

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.config = config
        c = config
        self.preprocessor = Preprocessor(c.patch_size, c.num_channels, c.width, rms_norm(c.norm_eps),
                                         num_positions=c.num_patches if c.pos_embed == "learned" else None)
        self.trunk = Trunk([aimv2_block(c.width, c.num_heads, c.hidden_dim, c.norm_eps) for _ in range(c.depth)],
                           nn.RMSNorm(c.width, eps=c.norm_eps))

    def extract_features(
        self, images: mx.array, max_block_id: Optional[int] = None
    ) -> tuple[mx.array, list[mx.array]]:
        """Runs the trunk up to block `max_block_id` (default: all blocks).

        Returns (the last run block's output after the final RMSNorm, the raw (B, N, D) output of every run
        block). N is the image's patch count, row by row.
        """
        images = check_images(images, self.config)
        check_image_size(images, self.config)
        max_block_id = _check_max_block_id(max_block_id, self.config.depth)
        x = self.preprocessor(images.astype(self.dtype))
        return self.trunk(x, None, max_block_id)


class AIMv2(_AIMv2Base):
    """The AIMv2 vision encoder (arXiv 2411.14402; apple/ml-aim, `aim-v2/aim/v2/torch/models.py`, `AIMv2`):
    `model(images)` returns what Apple's gives, the final normalised tokens (B, N, D) (after `post_trunk_norm`;
    transformers' `Aimv2VisionModel` `last_hidden_state`). Apple released no heads: `embed` raises
    `UntrainedHeadError`; a probe trained here composes with it as `ProbedAIMv2`.

    A fixed-size checkpoint (learned position embedding) takes images of its `image_size` only; at native
    resolution (`image_size` None, 2-D sin-cos position embedding computed per grid) any height and width that
    are multiples of the patch size, up to `max_patches` patches. No CLS token, bidirectional attention.
    """

    def __call__(self, images: mx.array) -> mx.array:
        normed, _ = self.extract_features(images)
        return normed

    def embed(self, images: mx.array) -> mx.array:
        raise self._no_head("pooled embedding", "model(images) gives its tokens, probe_features(images) the probe's "
                            "input")


class ProbedAIMv2(Probed, _AIMv2Base):
    """An AIMv2 encoder with an attentive probe trained here (`mlx-aim probe train`): `model(images)` returns the
    probe's (B, num_classes) logits, `embed` its pooled descriptor, `probe_features` its input (`Probed`)."""


# What a probe reads (`probe_features`): any AIM or AIMv2 trunk, probed or not.
TrunkModel = Union[AIMEncoder, AIM, AIMv2, ProbedAIMv2]


class AIMv2ImageEncoder(_AIMv2Base):
    """The LiT's image side: the AIMv2 encoder, then its trained attention-pool head: `(B, H, W, C) -> (B, D)`."""

    def __init__(self, config: AIMv2Config):
        super().__init__(config)
        self.head = AttentionPoolHead(config.width, config.num_heads)

    def __call__(self, images: mx.array) -> mx.array:
        normed, _ = self.extract_features(images)
        return self.head(normed)


class AIMv2TextEncoder(nn.Module):
    """The LiT's text side: token and learned positional embeddings, causal pre-norm blocks (RMSNorm, SwiGLU),
    the final norm, then the token at each row's first end-of-text id: `(B, N) token ids -> (B, text_width)`.
    The final norm acts per token, so norming before or after picking the token is the same."""

    def __init__(self, config: AIMv2LiTConfig):
        super().__init__()
        c = config
        self.context_length, self.eos_token_id = c.context_length, c.eos_token_id
        self.preprocessor = TextPreprocessor(c.vocab_size, c.text_width, c.context_length)
        self.trunk = Trunk([aimv2_block(c.text_width, c.text_num_heads, c.text_hidden_dim, c.text_norm_eps)
                            for _ in range(c.text_depth)], nn.RMSNorm(c.text_width, eps=c.text_norm_eps))

    def check_token_ids(self, token_ids) -> mx.array:
        """A (B, N) batch of token ids, N at most the context length, each row holding an end-of-text id."""
        token_ids = mx.array(token_ids) if not isinstance(token_ids, mx.array) else token_ids
        if token_ids.ndim != 2 or not mx.issubdtype(token_ids.dtype, mx.integer):
            raise ValueError(f"token_ids: expected a 2-D integer batch (batch, tokens), got shape "
                             f"{tuple(token_ids.shape)} of {token_ids.dtype}")
        if token_ids.shape[1] > self.context_length:
            raise ValueError(f"token_ids: {token_ids.shape[1]} tokens, over the context length {self.context_length}")
        has_eos = np.asarray(mx.any(token_ids == self.eos_token_id, axis=1))
        if not has_eos.all():
            raise ValueError(f"token_ids: rows {np.flatnonzero(~has_eos).tolist()} hold no end-of-text id "
                             f"({self.eos_token_id}), the token the text tower pools; tokenize with the CLIP tokenizer")
        return token_ids

    def __call__(self, token_ids: mx.array) -> mx.array:
        token_ids = self.check_token_ids(token_ids)
        x = self.preprocessor(token_ids)
        normed, _ = self.trunk(x, "causal")
        first_eos = mx.argmax((token_ids == self.eos_token_id).astype(mx.int32), axis=1)
        return normed[mx.arange(token_ids.shape[0]), first_eos]


class AIMv2LiT(nn.Module):
    """AIMv2-LiT, zero-shot image-text (apple/ml-aim, `aim-v2/aim/v2/torch/models.py`, `AIMv2LiT`), with Apple's
    parameter names.

    `encode_image` and `encode_text` give the projected (not normalised) embeddings; `model(images, token_ids)`
    returns Apple's pair (logits_per_image (B_img, B_text), logits_per_text = its transpose), each
    exp(clamp(log_logit_scale, 0, ln max_logit_scale)) times the cosine similarity. The text tower is causal.
    `has_text_tower` is False after `drop_text_tower` (image-only uses: a saved zero-shot head, image search).
    """

    def __init__(self, config: AIMv2LiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.image_encoder = AIMv2ImageEncoder(c.image)
        self.text_encoder = AIMv2TextEncoder(c)
        self.image_projector = Linear(c.image.width, c.projection_dim, bias=False)
        self.text_projector = Linear(c.text_width, c.projection_dim, bias=False)
        self.log_logit_scale = mx.array(math.log(1 / 0.07))  # CLIP's initial temperature, as Apple's
        self.has_text_tower = True

    @property
    def dtype(self) -> mx.Dtype:
        return self.image_encoder.dtype

    def drop_text_tower(self) -> "AIMv2LiT":
        """Removes the text tower and text projection, so their weights are neither loaded nor held (`load` with
        `text_tower=False`); `encode_text` and `__call__` then refuse."""
        del self.text_encoder, self.text_projector
        self.has_text_tower = False
        return self

    def encode_image(self, images: mx.array) -> mx.array:
        """(B, H, W, C) normalised NHWC images -> (B, projection_dim)."""
        return self.image_projector(self.image_encoder(images))

    def encode_text(self, token_ids: mx.array) -> mx.array:
        """(B, N) token ids (N <= context length, each row with an end-of-text id) -> (B, projection_dim)."""
        if not self.has_text_tower:
            raise ValueError(f"{self.config.name or 'this AIMv2-LiT'} was loaded without its text tower "
                             "(text_tower=False): load it whole to embed text")
        return self.text_projector(self.text_encoder(token_ids))

    @property
    def logit_scale(self) -> mx.array:
        return mx.exp(mx.clip(self.log_logit_scale, 0.0, math.log(self.config.max_logit_scale)))

    def __call__(self, images: mx.array, token_ids: mx.array) -> tuple[mx.array, mx.array]:
        image = normalized(self.encode_image(images))
        text = normalized(self.encode_text(token_ids))
        logits_per_text = (self.logit_scale.astype(text.dtype) * text) @ image.T
        return logits_per_text.T, logits_per_text


def normalized(x: mx.array) -> mx.array:
    """Each row over its L2 norm."""
    return x / mx.linalg.norm(x.astype(mx.float32), axis=-1, keepdims=True).astype(x.dtype)


class AIMForPretraining(_AIMBase):
    """Trunk plus pixel head: predicts each next patch's normalised pixels (AIM section 3)."""

    def __init__(self, config: AIMConfig):
        super().__init__(config)
        c = config
        self.pixel_head = PixelHead(c.width, c.head_width, c.head_depth, c.patch_dim, c.mlp_ratio, c.norm_eps)

    def __call__(
        self,
        images: mx.array,
        prefix_len: Optional[mx.array] = None,
        attention: str = "prefix",
        rows: Optional[mx.array] = None,
    ) -> mx.array:
        """(B, H, W, C) images -> (B, N, patch_dim) predictions; position i predicts patch i + 1.

        With `rows` (K,) int32, flat indices b * N + i into the trunk's (B * N) outputs, the pixel head runs on those
        rows only, each with its own position's embedding, and the result is (K, patch_dim): what the full call
        gives at those rows, for a fraction of the head's work (the loss counts about half the rows:
        `mlx_aim.models.objective.counted_rows`).
        """
        x, _ = self.extract_features(images, attention=attention, prefix_len=prefix_len)
        grid = (images.shape[1] // self.config.patch_size, images.shape[2] // self.config.patch_size)
        if rows is None:
            return self.pixel_head(x, grid)
        B, N, D = x.shape
        return self.pixel_head(x.reshape(B * N, D)[rows], grid, positions=rows % N)


# ---------------------------------------------------------------------------------------------------
# Precision and quantization policy

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Trunk linears are quantized (AIMv2's SwiGLU has a third, fc3). The patch embedding is a conv (and tiny); norms,
# AIMv2's learned position embedding and the probe head stay in float: the head is small (2 d^2 + 1000 d) and is
# where quantization error would reach the logits directly.
QUANTIZED_SUFFIXES = (".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc1.weight", ".mlp.fc2.weight",
                      ".mlp.fc3.weight")
# The trunks whose linears are quantized: the encoder's, and the LiT's two towers' (its heads and projections stay
# in float, like the probe).
QUANTIZED_TRUNKS = ("trunk.", "image_encoder.trunk.", "text_encoder.trunk.")
QUANTIZED_BITS = (4, 8)
QUANTIZED_GROUP_SIZES = (32, 64, 128)


def parse_dtype(dtype) -> Optional[mx.Dtype]:
    """None, an mx.Dtype or one of the names in `DTYPES` -> an mx.Dtype (None stays None)."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype) -> str:
    """A dtype's short name, as `DTYPES` keys it: mx.bfloat16 (or torch.bfloat16, or "bfloat16") -> "bfloat16"."""
    return str(dtype).split(".")[-1]


def parse_quantize(quantize, group_size: int = 64) -> Optional[dict]:
    """None, a bit count (4, 8) or a dict {"bits": b, "group_size": g} -> the config's quantization dict."""
    if quantize is None or quantize is False:
        return None
    if isinstance(quantize, dict):
        bits, group_size = quantize.get("bits"), quantize.get("group_size", group_size)
    else:
        bits = quantize
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"quantize bits={bits!r}: expected one of {QUANTIZED_BITS}")
    if group_size not in QUANTIZED_GROUP_SIZES:
        raise ValueError(f"quantization group size {group_size!r}: expected one of {QUANTIZED_GROUP_SIZES}")
    return {"bits": int(bits), "group_size": int(group_size)}


def is_quantized(key: str, shape: tuple, quantization: Optional[dict]) -> bool:
    """Whether the parameter `key` (of `shape`) is stored quantized under `quantization`."""
    return (
        quantization is not None
        and key.startswith(QUANTIZED_TRUNKS)
        and key.endswith(QUANTIZED_SUFFIXES)
        and shape[-1] % quantization["group_size"] == 0
    )


def quantize_predicate(quantization: dict):
    """`nn.quantize`'s class_predicate for `quantization`: the linear layers `is_quantized` names."""
    return lambda path, module: (
        isinstance(module, nn.Linear) and is_quantized(path + ".weight", module.weight.shape, quantization)
    )


# ---------------------------------------------------------------------------------------------------
# Construction


def _init_weights(module: nn.Module) -> nn.Module:
    """ViT/MAE-style initialisation: xavier-uniform for linear layers and the patch embedding (viewed as a
    linear layer over a flattened patch), zero biases, LayerNorms at (1, 0). Uses MLX's global generator."""
    glorot = nn.init.glorot_uniform()
    updates = []
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            w = sub.weight
            flat = glorot(mx.zeros((w.shape[0], int(np.prod(w.shape[1:]))), dtype=w.dtype))
            updates.append((f"{name}.weight", flat.reshape(w.shape)))
            if "bias" in sub:
                updates.append((f"{name}.bias", mx.zeros_like(sub.bias)))
    module.load_weights(updates, strict=False)
    return module


def _model_class(config: Config, pretraining: bool, probe: bool) -> type:
    if isinstance(config, AIMv2LiTConfig):
        return AIMv2LiT
    if isinstance(config, AIMv2Config):
        return ProbedAIMv2 if probe else AIMv2
    return AIMForPretraining if pretraining else AIM if probe else AIMEncoder


def _seeded(config: Config, seed: int, pretraining: bool, probe: bool) -> _Encoder:
    mx.random.seed(seed)
    if isinstance(config, AIMv2LiTConfig):
        return _init_weights(AIMv2LiT(config))
    if isinstance(config, AIMv2Config):
        # Drawn as the probed model: a seeded encoder and a seeded probed model share their trunk.
        start = _init_weights(ProbedAIMv2(config))
        if probe:
            return start
    else:
        start = _init_weights(AIMForPretraining(config))
        if pretraining:
            return start
    model = _model_class(config, False, probe)(config)
    if probe:
        _init_weights(model.head)
    # AIM: the pre-training model's own modules, so a seeded trunk starts where pre-training with `seed` does.
    model.preprocessor, model.trunk = start.preprocessor, start.trunk
    return model


def with_probe(trunk: _Encoder, head: AttentionProbe) -> Union[AIM, ProbedAIMv2]:
    """`trunk`'s preprocessor and trunk (shared, not copied) composed with the trained probe `head`: an `AIM` for an
    AIM trunk, a `ProbedAIMv2` for an AIMv2 one (a probed model's head is replaced). The config takes the head's
    class count; the head follows the trunk's mode."""
    if not isinstance(trunk, (_AIMBase, _AIMv2Base)) or not isinstance(head, AttentionProbe):
        raise TypeError(f"with_probe: expected an AIM or AIMv2 trunk and an AttentionProbe, got "
                        f"{type(trunk).__name__} and {type(head).__name__}")
    if head.linear.weight.shape[1] != trunk.config.width:
        raise ValueError(f"with_probe: a head of width {head.linear.weight.shape[1]} on a trunk of width "
                         f"{trunk.config.width}")
    cls = AIM if isinstance(trunk, _AIMBase) else ProbedAIMv2
    model = cls.__new__(cls)  # composed of existing modules: nothing built, nothing drawn from MLX's generator
    nn.Module.__init__(model)
    model.config = trunk.config.replace(num_classes=head.linear.weight.shape[0])
    model.preprocessor, model.trunk, model.head = trunk.preprocessor, trunk.trunk, head
    return model.train(trunk.training)


def build_model(
    config: Config,
    dtype=None,
    quantization=None,
    seed: Optional[int] = None,
    *,
    pretraining: bool = False,
    probe: bool = False,
) -> Union[AIMEncoder, AIM, AIMForPretraining, AIMv2, ProbedAIMv2, AIMv2LiT]:
    """The one constructor of a model: for an `AIMConfig` the trunk `AIMEncoder`, or with `pretraining` the
    `AIMForPretraining` (in training mode; the others are in eval mode); for an `AIMv2Config` the encoder `AIMv2`;
    for an `AIMv2LiTConfig` the zero-shot `AIMv2LiT`. With `probe`, an AIM or AIMv2 trunk composed with an attentive
    probe of `config.num_classes` classes (`AIM`, `ProbedAIMv2`), freshly initialised: the shapes a trained probe
    is loaded into (as `load` does), or a classifier to time. Parameters stay lazy until first used, so a model
    about to be loaded never materialises its random weights.

    dtype: an mx.Dtype or a name in `DTYPES` (default float32). quantization: 4 or 8 bits or a dict
    (`parse_quantize`) for the trunk's linear layers (`is_quantized`), recorded in the model's config
    (default: what `config.quantization` says). seed: None keeps MLX's default initialisation, drawn from MLX's
    global generator as it stands; an int seeds that generator and draws the paper's initialisation (xavier-
    uniform linears and patch embedding, zero biases). A seeded AIM trunk's preprocessor and trunk are exactly
    those the pre-training model of the same seed starts from: the random baseline of that pre-training run.
    AIMv2's learned position embedding is drawn as Apple initialises it, normal with std 0.02, seeded or not.
    """
    if not isinstance(config, (AIMConfig, AIMv2Config, AIMv2LiTConfig)):
        raise TypeError(f"build_model: expected an AIMConfig, AIMv2Config or AIMv2LiTConfig, got "
                        f"{type(config).__name__}")
    if pretraining and isinstance(config, (AIMv2Config, AIMv2LiTConfig)):
        raise ValueError("AIMv2 has no pre-training model here: its encoders were pre-trained with a multimodal "
                         "decoder that Apple did not release; build it without pretraining")
    if probe and (pretraining or isinstance(config, AIMv2LiTConfig)):
        raise ValueError("probe: an attentive probe goes on an AIM or AIMv2 trunk, not on the pre-training model "
                         "nor on an AIMv2-LiT (which pools with its own head)")
    dtype = parse_dtype(dtype)
    quantization = config.quantization if quantization is None else parse_quantize(quantization)
    if config.quantization and quantization != config.quantization:
        raise ValueError(f"config is quantized as {config.quantization}; cannot build it as {quantization}")
    if pretraining and quantization:
        raise ValueError("the pre-training model is trained in float: build it without quantization")
    config = config.replace(quantization=None)
    if seed is not None:
        model = _seeded(config, seed, pretraining, probe)
    else:
        model = _model_class(config, pretraining, probe)(config)
    if dtype is not None and dtype != mx.float32:
        model.set_dtype(dtype)
    if quantization:
        nn.quantize(model, quantization["group_size"], quantization["bits"],
                    class_predicate=quantize_predicate(quantization))
        model.config = config.replace(quantization=quantization)
    if not pretraining:
        model.eval()
    return model
