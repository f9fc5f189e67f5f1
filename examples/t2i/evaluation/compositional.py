r"""A GenEval-style compositional score for the procedural shapes data, read by a classifier trained on its truth.

GenEval (Ghosh et al., 2023) asks an object detector whether a generated image shows the objects, counts,
colours and positions its prompt asked for. For :class:`~examples.t2i.data.ShapesDataset` prompts the
generator knows the exact scene behind every caption, so a small CNN trained on rendered scenes and their
ground truth (:func:`~examples.t2i.data.scene_labels`) can play the detector: :class:`ShapesReader`
predicts, for every cell of the scene grid, whether it is empty and otherwise the object's shape, colour and
size. :func:`compositional_scores` then compares its reading of a generated image with the prompt's scene:

* ``compositional_score``: the fraction of images that are entirely right: every asked-for object present
  in its cell with the right shape, colour and size, and nothing else (GenEval's per-prompt success);
* ``object_accuracy`` / ``shape_accuracy`` / ``colour_accuracy`` / ``size_accuracy``: per asked-for object;
* ``position_accuracy``: an object (of any kind) is where the prompt put one;
* ``count_accuracy``: the number of objects is right;
* GenEval-like task splits: ``single_object`` (one-object prompts), ``two_object`` (two different kinds),
  ``counting`` (a repeated kind: "two red circles"), ``colour_attribution`` (two kinds of different colours,
  each with its own colour right).

The reader (:mod:`~examples.t2i.evaluation.shapes_reader`) is trained once per data configuration and cached. To
make the score interpretable it is reported together with the reader's accuracy on **held-out real images**:
the score of real images is the ceiling a perfect generator would reach.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from examples.t2i.evaluation.levels import euler_level_estimates, ntm_level_estimates
from examples.t2i.evaluation.shapes_reader import (
    ShapesReader,
    ShapesReaderConfig,
    ShapesReaderLoss,
    load_or_train_shapes_reader,
    render_shapes,
    shapes_dataset,
    train_shapes_reader,
)
from trajflow.metrics import frechet_distance
from trajflow.model import NTM
from trajflow.process import time_grid

__all__ = [
    "ShapesReaderConfig",
    "ShapesReader",
    "render_shapes",
    "shapes_dataset",
    "ShapesReaderLoss",
    "train_shapes_reader",
    "load_or_train_shapes_reader",
    "compositional_scores",
    "PROMPT_SEED",
    "shapes_prompts",
    "evaluate_shapes_model",
]


def compositional_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Compare read-back labels with the prompts' scenes; both ``(N, cells, 3)`` as :func:`scene_labels`.

    Returns the metrics listed in the module docstring (task splits are ``nan`` when no prompt is of that
    kind) and ``n``, the number of images.

    Example:
        >>> t = torch.tensor([[[1, 2, 1], [0, 0, 0]]]); p = t.clone()
        >>> compositional_scores(p, t)["compositional_score"]
        1.0
        >>> p[0, 1] = torch.tensor([1, 1, 1])  # an extra object
        >>> s = compositional_scores(p, t); s["compositional_score"], s["object_accuracy"], s["count_accuracy"]
        (0.0, 1.0, 0.0)
    """
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 3:
        raise ValueError(
            f"pred: expected the shape of target (N, cells, 3), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    gt = target[..., 0] > 0  # (N, cells)
    found = pred[..., 0] > 0
    same = pred == target  # (N, cells, 3)
    obj_ok = same.all(-1) & gt
    image_ok = ((obj_ok | ~gt).all(1)) & (found == gt).all(1)
    count_ok = found.sum(1) == gt.sum(1)

    def mean(x: Tensor) -> float:
        return float(x.float().mean()) if x.numel() else float("nan")

    # Task kinds from the ground truth: distinct (shape, colour, size) kinds per prompt.
    kinds, repeated, two_colours = [], [], []
    for i in range(target.shape[0]):
        rows = [tuple(r.tolist()) for r in target[i][gt[i]]]
        kinds.append(len(set(rows)))
        repeated.append(len(rows) > len(set(rows)))
        two_colours.append(len({r[1] for r in rows}) >= 2)
    kinds_t, repeated_t, two_t = torch.tensor(kinds), torch.tensor(repeated), torch.tensor(two_colours)
    n_obj = gt.sum(1)
    colour_ok_all = ((same[..., 1] & gt) | ~gt).all(1) & (found == gt).all(1)
    return {
        "compositional_score": mean(image_ok),
        "object_accuracy": mean(obj_ok[gt]),
        "shape_accuracy": mean(same[..., 0][gt]),
        "colour_accuracy": mean(same[..., 1][gt]),
        "size_accuracy": mean(same[..., 2][gt]),
        "position_accuracy": mean(found[gt]),
        "count_accuracy": mean(count_ok),
        "single_object": mean(image_ok[n_obj == 1]),
        "two_object": mean(image_ok[kinds_t == 2]),
        "counting": mean(count_ok[repeated_t]),
        "colour_attribution": mean(colour_ok_all[two_t]),
        "n": int(target.shape[0]),
    }


#: Scene seed of the evaluation prompts: apart from the training data (seed 0 by default) and the reader's sets.
PROMPT_SEED = 9_000_001


def shapes_prompts(
    data_config: Mapping[str, Any], n: int, *, seed: int = PROMPT_SEED
) -> tuple[list[str], Tensor, Tensor]:
    """``n`` held-out prompts of the shapes data: ``(captions, real images (n, 3, R, R), labels (n, cells, 3))``."""
    ds = shapes_dataset(data_config, seed=seed, length=n)
    images, labels = render_shapes(ds)
    captions = [ds.caption(ds.scene(i)) for i in range(n)]
    return captions, images, labels


def evaluate_shapes_model(
    bundle: Any,
    reader: ShapesReader,
    *,
    n_prompts: int = 256,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    prompt_seed: int = PROMPT_SEED,
    progress: bool = False,
) -> tuple[dict[str, Any], Tensor, list[str]]:
    """Generate one image per held-out prompt and score it: compositional metrics and the Fréchet distance
    between the reader's features of the generated and of the real images of the same prompts.

    Arguments:
        bundle: A :class:`~examples.t2i.model.T2IModel` trained on shapes.
        reader: The :class:`ShapesReader` for that data.

    Returns:
        ``(metrics, images, captions)``; metrics hold the :func:`compositional_scores`, ``frechet_distance``,
        ``sample_seconds`` and ``sample_images_per_s``.
    """
    captions, real, labels = shapes_prompts(bundle.config.to_dict()["data"], n_prompts, seed=prompt_seed)
    t0 = time.perf_counter()
    images = bundle.generate(
        captions, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, progress=progress
    )
    seconds = time.perf_counter() - t0
    pred = reader.predict(images)
    metrics: dict[str, Any] = compositional_scores(pred, labels)
    metrics["frechet_distance"] = frechet_distance(reader.extract(real).double(), reader.extract(images).double())
    metrics["sample_seconds"] = seconds
    metrics["sample_images_per_s"] = len(captions) / max(seconds, 1e-9)
    return metrics, images, captions


def evaluate_shapes_levels(
    bundle: Any,
    reader: ShapesReader,
    *,
    n_prompts: int = 256,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    prompt_seed: int = PROMPT_SEED,
) -> list[dict[str, Any]]:
    """Score the sampler's clean-image estimate after every step (:mod:`examples.t2i.evaluation.levels`).

    Returns one dict per step, from the first (from noise) to the last: ``level`` (``T`` .. 1), ``t`` (the
    step's start time) and the :func:`compositional_scores` of the estimates for the held-out prompts. A
    prompt whose composition is already right at an early level was decided there; the last level is the
    mean of the final step. Works for NTM (any predictor) and flow-matching bundles.
    """
    cfg = bundle.config
    steps = cfg.sample.steps if steps is None else steps
    guidance = cfg.sample.guidance if guidance is None else guidance
    captions, _, labels = shapes_prompts(cfg.to_dict()["data"], n_prompts, seed=prompt_seed)
    model = bundle.model.eval()
    device = next(model.parameters()).device
    feats, mask = bundle.encoder.encode(captions)
    cond = (feats.to(device, torch.float32), mask.to(device))
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((len(captions), *model.event_shape), generator=g, device=device)
    shift = cfg.shift_for(bundle.data_shape)
    if isinstance(model, NTM):
        t_min = cfg.sample.t_min
        est = ntm_level_estimates(
            model, noise, cond=cond, steps=steps, t_min=t_min, shift=shift, guidance=guidance, generator=g
        )
    else:
        t_min = 0.0
        est = euler_level_estimates(model, noise, cond=cond, steps=steps, shift=shift, guidance=guidance)
    times = time_grid(steps, t_min, shift).tolist()
    rows = []
    for i in range(steps):
        x = est[i]
        if getattr(bundle, "vae", None) is not None:
            x = bundle.vae.decode(x)
        scores = compositional_scores(reader.predict(x.float().clamp(-1, 1).cpu()), labels)
        rows.append({"level": steps - i, "t": times[steps - i], **scores})
    return rows
