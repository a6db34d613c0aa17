"""AIM models: the classifier (trunk + attentive probe) and the pre-training model (trunk + pixel head).

Input layout: NHWC float images, (batch, height, width, channels), normalised as in `mlx_aim.data`.
NHWC is MLX's native convolution layout; NCHW input is rejected with an error that says how to transpose.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import AIMConfig
from .layers import AttentionMask, AttentionProbe, PixelHead, Preprocessor, Trunk, attention_mask


def check_images(images, config: AIMConfig) -> mx.array:
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
            hint = f"; this looks like NCHW: mlx-aim takes NHWC, use images.transpose(0, 2, 3, 1)"
        raise ValueError(f"images: expected {C} channels last (NHWC), got shape {tuple(images.shape)}{hint}")
    if H % p or W % p:
        raise ValueError(f"images: height and width must be multiples of the patch size {p}, got {H}x{W}")
    return images


class _AIMBase(nn.Module):
    """The preprocessor and trunk shared by both models, with Apple's parameter names."""

    def __init__(self, config: AIMConfig):
        super().__init__()
        self.config = config
        c = config
        self.preprocessor = Preprocessor(c.patch_size, c.num_channels, c.width, c.norm_eps)
        self.trunk = Trunk(c.width, c.depth, c.num_heads, c.mlp_ratio, c.norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        return self.trunk.post_trunk_norm.weight.dtype

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
        if max_block_id is not None and not -self.config.depth <= max_block_id < self.config.depth:
            raise ValueError(f"max_block_id={max_block_id}: expected a block index below {self.config.depth}")
        if max_block_id is not None and max_block_id < 0:
            max_block_id += self.config.depth
        x = self.preprocessor(images.astype(self.dtype))
        mask = attention_mask(attention or self.config.attention, x.shape[1], prefix_len)
        return self.trunk(x, mask, max_block_id)


class AIM(_AIMBase):
    """Trunk plus attentive probe: `model(images)` returns ImageNet (or `num_classes`) logits."""

    def __init__(self, config: AIMConfig):
        super().__init__(config)
        self.head = AttentionProbe(config.width, config.num_heads, config.num_classes, config.norm_eps)

    def probe_features(self, images: mx.array, attention: Optional[str] = None) -> mx.array:
        """The probe's input: the mean of the probe layers' raw outputs, (B, N, D)."""
        _, features = self.extract_features(images, self.config.max_block_id, attention)
        return mx.stack([features[i] for i in self.config.probe_layers]).mean(axis=0)

    def __call__(self, images: mx.array, attention: Optional[str] = None) -> mx.array:
        logits, _ = self.head(self.probe_features(images, attention))
        return logits

    def embed(self, images: mx.array, attention: Optional[str] = None) -> mx.array:
        """The probe's attention-pooled embedding, (B, D): a global image descriptor for retrieval."""
        _, pooled = self.head(self.probe_features(images, attention))
        return pooled


class AIMForPretraining(_AIMBase):
    """Trunk plus pixel head: predicts each next patch's normalised pixels (AIM section 3)."""

    def __init__(self, config: AIMConfig):
        super().__init__(config)
        c = config
        self.pixel_head = PixelHead(c.width, c.head_width, c.head_depth, c.patch_dim, c.mlp_ratio, c.norm_eps)

    def __call__(
        self, images: mx.array, prefix_len: Optional[mx.array] = None, attention: str = "prefix"
    ) -> mx.array:
        """(B, H, W, C) images -> (B, N, patch_dim) predictions; position i predicts patch i + 1."""
        x, _ = self.extract_features(images, attention=attention, prefix_len=prefix_len)
        grid = (images.shape[1] // self.config.patch_size, images.shape[2] // self.config.patch_size)
        return self.pixel_head(x, grid)


def build_model(config: AIMConfig, dtype: mx.Dtype = mx.float32) -> AIM:
    """An AIM classifier with random weights in `dtype`, in eval mode."""
    model = AIM(config)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    model.eval()
    return model
