"""Evaluation of generated images without downloaded weights.

* :mod:`examples.t2i.evaluation.compositional`: a GenEval-style compositional score for the procedural shapes
  data, read by a small classifier trained on the generator's ground truth
  (:mod:`examples.t2i.evaluation.shapes_reader`; cached, with its held-out accuracy reported so the score can be
  interpreted).
* :mod:`examples.t2i.evaluation.features`: feature networks trained locally for Fréchet distances (a
  contrastive image-text network for any text-image data; for shapes, the reader's features), and FID /
  CLIP score through ``torchmetrics`` only when the user has the weights on disk.

Both networks train with :class:`trajflow.train.Trainer` and are cached in its checkpoint format
(:mod:`examples.t2i.evaluation.evaluator_cache`).
"""

from examples.t2i.evaluation.compositional import (
    PROMPT_SEED,
    ShapesReader,
    ShapesReaderConfig,
    ShapesReaderLoss,
    compositional_scores,
    evaluate_shapes_levels,
    evaluate_shapes_model,
    load_or_train_shapes_reader,
    render_shapes,
    shapes_dataset,
    shapes_prompts,
    train_shapes_reader,
)
from examples.t2i.evaluation.features import (
    ContrastiveLoss,
    FeatureNetConfig,
    ImageEncoder,
    TextImageFeatures,
    dataset_pairs,
    evaluate_text_image_model,
    frechet_distance_of,
    load_or_train_text_image_features,
    torchmetrics_clip_score,
    torchmetrics_fid,
    train_text_image_features,
)

__all__ = [
    "ShapesReader",
    "ShapesReaderConfig",
    "ShapesReaderLoss",
    "compositional_scores",
    "evaluate_shapes_model",
    "evaluate_shapes_levels",
    "shapes_prompts",
    "shapes_dataset",
    "PROMPT_SEED",
    "load_or_train_shapes_reader",
    "render_shapes",
    "train_shapes_reader",
    "FeatureNetConfig",
    "ContrastiveLoss",
    "ImageEncoder",
    "TextImageFeatures",
    "frechet_distance_of",
    "dataset_pairs",
    "evaluate_text_image_model",
    "load_or_train_text_image_features",
    "train_text_image_features",
    "torchmetrics_fid",
    "torchmetrics_clip_score",
]
