"""Small neural-network parts shared by transporters, predictors and velocity models."""

from .embeddings import SinusoidalEmbedding
from .mlp import ResidualMLP
from .scale import positive_scale, soft_clip

__all__ = ["SinusoidalEmbedding", "ResidualMLP", "positive_scale", "soft_clip"]
