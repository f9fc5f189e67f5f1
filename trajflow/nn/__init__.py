"""Small neural-network parts shared by transporters, predictors and velocity models."""

from .embeddings import SinusoidalEmbedding
from .mlp import ResidualMLP
from .parameters import count_parameters
from .patches import check_images, patch_grid, patchify, unpatchify
from .scale import positive_scale, soft_clip
from .transformer import (
    Attention,
    KVCache,
    RotaryEmbedding2D,
    StaticKVCache,
    Transformer,
    TransformerLayer,
    apply_rotary,
    grouped_attention,
)

__all__ = [
    "SinusoidalEmbedding",
    "ResidualMLP",
    "count_parameters",
    "positive_scale",
    "soft_clip",
    "patchify",
    "unpatchify",
    "patch_grid",
    "check_images",
    "Transformer",
    "TransformerLayer",
    "Attention",
    "KVCache",
    "StaticKVCache",
    "grouped_attention",
    "RotaryEmbedding2D",
    "apply_rotary",
]
