r"""The shapes reader: a small CNN that reads a shapes scene back, trained on the generator's ground truth.

:class:`ShapesReader` predicts, for every cell of a :class:`~examples.t2i.data.shapes.ShapesDataset` scene grid,
whether it is empty and otherwise the object's shape, colour and size; :mod:`~examples.t2i.evaluation.compositional`
scores generated images with it. It is trained once per data configuration with :class:`~trajflow.train.Trainer`
(:class:`ShapesReaderLoss`) and cached in the Trainer's checkpoint format (:func:`load_or_train_shapes_reader`,
:mod:`~examples.t2i.evaluation.evaluator_cache`), with its accuracy on **held-out real images** (other scene seeds
than its training set) in the report, so that a score read by it can be interpreted. It sees noise-augmented
images in training, since samples of small generators are noisy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from examples.t2i.data.shapes import ShapesDataset
from examples.t2i.evaluation.evaluator_cache import (
    CACHE_VERSION,
    cached_config,
    entry_dir,
    evaluator_trainer_config,
    fit_evaluator,
    load_evaluator,
    noise_augment,
    save_report,
)
from trajflow.train import TrainerConfig

__all__ = [
    "ShapesReaderConfig",
    "ShapesReader",
    "ShapesReaderLoss",
    "render_shapes",
    "shapes_dataset",
    "train_shapes_reader",
    "load_or_train_shapes_reader",
]


@dataclass
class ShapesReaderConfig:
    """Size and training of :class:`ShapesReader`.

    Attributes:
        width: Channels of the convolutional trunk.
        hidden: Features per grid cell (the Fréchet features are these, for every cell).
        train_size: Rendered training scenes.
        heldout_size: Rendered held-out scenes (accuracy report).
        epochs, batch_size, lr: Adam training (through :class:`~trajflow.train.Trainer`: 10% warmup, then a
            cosine decay to zero).
        noise: Training images get Gaussian noise of a standard deviation drawn in ``[0, noise]``.
        train_seed, heldout_seed: Scene seeds of the two sets (keep them apart from the generator's training
            seed and from the evaluation prompts' seed).
        seed: Seed of initialisation and batching.
    """

    width: int = 32
    hidden: int = 32
    train_size: int = 8000
    heldout_size: int = 1000
    epochs: int = 16
    batch_size: int = 128
    lr: float = 2e-3
    noise: float = 0.15
    train_seed: int = 7_000_001
    heldout_seed: int = 7_000_002
    seed: int = 0


class ShapesReader(nn.Module):
    """Reads a shapes scene back: per grid cell, ``empty`` or (shape, colour, size).

    A small CNN (one stride-2 stage) whose feature map is average-pooled onto a ``2 grid x 2 grid`` grid, so
    that each cell of the scene layout is a 2x2 block of features; a shared per-cell MLP gives ``hidden``
    features per cell, and three linear heads read them.
    Class 0 of every head means "empty cell", class ``1 + i`` is ``vocabulary[...][i]``.

    Arguments:
        vocabulary: :attr:`ShapesDataset.vocabulary` (``shape``, ``colour``, ``size`` lists are used).
        grid: The scene grid (2 or 3).
        config: A :class:`ShapesReaderConfig`.

    Example:
        >>> r = ShapesReader({"shape": ["circle"], "colour": ["red", "blue"], "size": ["large"]}, grid=2)
        >>> logits = r(torch.zeros(5, 3, 16, 16))
        >>> tuple(logits["shape"].shape), tuple(r.features(torch.zeros(5, 3, 16, 16)).shape)
        ((5, 4, 2), (5, 128))
    """

    def __init__(self, vocabulary: Mapping[str, list[str]], grid: int, config: ShapesReaderConfig | None = None):
        super().__init__()
        self.config = config or ShapesReaderConfig()
        self.vocabulary = {k: list(vocabulary[k]) for k in ("shape", "colour", "size")}
        self.grid = grid
        w, h = self.config.width, self.config.hidden
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GELU(),
        )
        # Each cell is pooled to 2x2 (not 1x1), so that the cell MLP still sees the object's layout: a circle and
        # a diamond of one colour have nearly the same mean features.
        self.cell = nn.Sequential(nn.Linear(8 * w, 4 * w), nn.GELU(), nn.Linear(4 * w, h), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(h, 1 + len(v)) for k, v in self.vocabulary.items()})

    def _cells(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> per-cell features ``(N, cells, hidden)`` in reading order."""
        z = F.adaptive_avg_pool2d(self.trunk(x), 2 * self.grid)  # (N, C, 2g, 2g); cells tile the image exactly
        n, c, g = z.shape[0], z.shape[1], self.grid
        z = z.reshape(n, c, g, 2, g, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 4 * c)
        return self.cell(z)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per cell in reading order: ``{"shape": (N, cells, 1 + S), "colour": ..., "size": ...}``."""
        c = self._cells(x)
        return {k: head(c) for k, head in self.heads.items()}

    def features(self, x: Tensor) -> Tensor:
        """Per-cell features, concatenated: ``(N, cells * hidden)`` (for Fréchet distances)."""
        return self._cells(x).flatten(1)

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """Labels ``(N, cells, 3)`` (``[shape, colour, size]``, 0 = empty), the layout of ``scene_labels``."""
        out = []
        for i in range(0, x.shape[0], batch_size):
            logits = self(x[i : i + batch_size].to(self._device()))
            labels = torch.stack([logits[k].argmax(-1) for k in ("shape", "colour", "size")], dim=-1)
            # An empty cell is empty in all three heads; the shape head decides emptiness.
            labels = torch.where(labels[..., :1] == 0, torch.zeros_like(labels), labels)
            out.append(labels.cpu())
        return torch.cat(out)

    @torch.no_grad()
    def extract(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`features` of many images, batched, on the CPU."""
        return torch.cat(
            [self.features(x[i : i + batch_size].to(self._device())).cpu() for i in range(0, len(x), batch_size)]
        )

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def render_shapes(dataset: Any, *, progress: bool = False, desc: str = "render") -> tuple[Tensor, Tensor]:
    """All images ``(N, 3, R, R)`` and labels ``(N, cells, 3)`` of a :class:`ShapesDataset`."""
    images, labels = [], []
    for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        item = dataset[i]
        images.append(item["image"])
        labels.append(item["labels"])
    return torch.stack(images), torch.stack(labels)


def _masked_ce(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    if mask is None:
        return loss.mean()
    m = mask.flatten().float()
    return (loss * m).sum() / m.sum().clamp_min(1.0)


class ShapesReaderLoss:
    """The reader's objective for :class:`~trajflow.train.Trainer`: per-cell cross-entropies of the three heads.

    ``batch`` is ``(images (B, 3, R, R), labels (B, cells, 3))``. Each image first gets Gaussian noise of a
    standard deviation drawn in ``[0, noise]`` (generated samples are rarely clean). Colour and size are only
    scored on cells that hold an object; the shape head also learns "empty".
    """

    loss_name = "reader_loss"

    def __init__(self, noise: float) -> None:
        self.noise = noise

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator, step: int) -> Tensor:
        x, y = batch
        x = noise_augment(x, self.noise, generator)
        logits = model(x)
        present = y[..., 0] > 0  # (B, cells)
        loss = _masked_ce(logits["shape"], y[..., 0])
        loss = loss + _masked_ce(logits["colour"], y[..., 1], present)
        return loss + _masked_ce(logits["size"], y[..., 2], present)


def _trainer_config(cfg: ShapesReaderConfig, n_train: int, progress: bool, device: torch.device) -> TrainerConfig:
    """Adam (no weight decay), 10% warmup and a cosine decay to zero over ``epochs`` epochs."""
    max_steps = max(cfg.epochs * (n_train // cfg.batch_size), 1)
    return evaluator_trainer_config(
        max_steps, cfg.batch_size, cfg.lr, cfg.seed, warmup_steps=max_steps // 10, progress=progress, device=device
    )


def train_shapes_reader(
    make_dataset: Any,
    vocabulary: Mapping[str, list[str]],
    grid: int,
    config: ShapesReaderConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    out_dir: str | Path | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> tuple[ShapesReader, dict[str, Any]]:
    """Train a :class:`ShapesReader` on rendered scenes with :class:`~trajflow.train.Trainer` and report its
    held-out accuracy.

    Arguments:
        make_dataset: ``make_dataset(seed, length) -> ShapesDataset`` with the generator settings to read.
        vocabulary, grid: Those of the datasets.
        config: Training settings.
        out_dir: The Trainer's output folder (its checkpoint holds the reader); ``None``: a temporary one.
        run_config: Saved with the checkpoint (default: ``{"reader": config}``).

    Returns:
        The reader (eval mode, on ``device``) and a report: held-out per-cell accuracies and the
        :func:`compositional_scores` of held-out **real** images (the ceiling of any generator's score).
    """
    cfg = config or ShapesReaderConfig()
    device = torch.device(device)
    t0 = time.perf_counter()
    x, y = render_shapes(make_dataset(cfg.train_seed, cfg.train_size), progress=progress, desc="reader: render")
    xh, yh = render_shapes(make_dataset(cfg.heldout_seed, cfg.heldout_size), progress=progress, desc="held-out")
    reader, result = fit_evaluator(
        lambda: ShapesReader(vocabulary, grid, cfg),
        ShapesReaderLoss(cfg.noise),
        TensorDataset(x, y),
        _trainer_config(cfg, len(x), progress, device),
        {"reader": asdict(cfg)} if run_config is None else run_config,
        out_dir=out_dir,
        device=device,
    )
    report = {**_heldout_report(reader, xh, yh), "train_images": len(x), "train_steps": result.step}
    report.update(train_loss=result.loss, train_seconds=time.perf_counter() - t0, config=asdict(cfg))
    return reader, report


def _heldout_report(reader: ShapesReader, xh: Tensor, yh: Tensor) -> dict[str, Any]:
    from examples.t2i.evaluation.compositional import (
        compositional_scores,  # the scores read with this reader (which imports it)
    )

    pred = reader.predict(xh)
    present = yh[..., 0] > 0
    return {
        "heldout_images": len(xh),
        "heldout_cell_accuracy": float((pred[..., 0] == yh[..., 0]).float().mean()),
        "heldout_shape_accuracy": float((pred[..., 0] == yh[..., 0])[present].float().mean()),
        "heldout_colour_accuracy": float((pred[..., 1] == yh[..., 1])[present].float().mean()),
        "heldout_size_accuracy": float((pred[..., 2] == yh[..., 2])[present].float().mean()),
        "heldout_real_scores": compositional_scores(pred, yh),
    }


#: The generator settings a reader depends on (a ``DataConfig``'s other fields, e.g. ``length``, do not matter).
_SCENE_FIELDS = ("resolution", "grid", "max_objects", "max_groups", "shapes", "colours", "sizes", "backgrounds")


def shapes_dataset(data_config: Mapping[str, Any], *, seed: int, length: int) -> ShapesDataset:
    """The :class:`~examples.t2i.data.shapes.ShapesDataset` that a data config (a ``DataConfig`` as a dict)
    describes, with scene ``seed`` and ``length`` of one's choice (held-out scenes).

    Fields the dict leaves out take the generator's defaults; fields that do not shape scenes are ignored.

    Example:
        >>> ds = shapes_dataset({"name": "shapes", "resolution": 16, "grid": 2}, seed=5, length=3)
        >>> len(ds), ds.grid, ds[0]["image"].shape
        (3, 2, torch.Size([3, 16, 16]))
    """
    data = dict(data_config)
    if data.get("name", "shapes") != "shapes":
        raise ValueError(f"data_config: the compositional score reads shapes scenes, got name={data['name']!r}")
    kwargs = {f: data[f] for f in _SCENE_FIELDS if data.get(f) is not None}
    for f in ("shapes", "colours", "sizes", "backgrounds"):
        if f in kwargs:
            kwargs[f] = tuple(kwargs[f])
    return ShapesDataset(length=length, seed=seed, **kwargs)


def _scene_settings(dataset: ShapesDataset) -> dict[str, Any]:
    """The generator settings of a :class:`ShapesDataset` (defaults filled in), as JSON values."""
    return {f: list(v) if isinstance(v := getattr(dataset, f), tuple) else v for f in _SCENE_FIELDS}


def load_or_train_shapes_reader(
    cache_dir: str | Path,
    data_config: Mapping[str, Any],
    config: ShapesReaderConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[ShapesReader, dict[str, Any]]:
    """A :class:`ShapesReader` for the shapes data that ``data_config`` (a ``DataConfig`` as a dict) describes,
    trained once and cached in ``cache_dir``.

    The cache entry is the Trainer's output folder ``shapes-reader-<digest>/`` (see
    :mod:`~examples.t2i.evaluation.evaluator_cache`), keyed by the scene generator's settings and ``config``: another
    config trains another reader. An entry whose checkpoint was written for another config raises a
    ``ValueError`` naming the differing fields.
    """
    cfg = config or ShapesReaderConfig()
    probe = shapes_dataset(data_config, seed=0, length=1)
    key = {"data": _scene_settings(probe), "reader": asdict(cfg), "v": CACHE_VERSION}
    folder = entry_dir(cache_dir, "shapes-reader", key)
    if cached_config(folder) is not None:
        reader = ShapesReader(probe.vocabulary, probe.grid, cfg)
        return reader, load_evaluator(folder, reader, key, device)

    def make(seed: int, length: int) -> ShapesDataset:
        return shapes_dataset(data_config, seed=seed, length=length)

    reader, report = train_shapes_reader(
        make, probe.vocabulary, probe.grid, cfg, device=device, progress=progress, out_dir=folder, run_config=key
    )
    report["key"] = key
    save_report(folder, report)
    return reader, report
