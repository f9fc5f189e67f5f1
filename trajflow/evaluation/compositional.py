r"""A GenEval-style compositional score for the procedural shapes data, read by a classifier trained on its truth.

GenEval (Ghosh et al., 2023) asks an object detector whether a generated image shows the objects, counts,
colours and positions its prompt asked for. For :class:`~trajflow.data.text_image.ShapesDataset` prompts the
generator knows the exact scene behind every caption, so a small CNN trained on rendered scenes and their
ground truth (:func:`~trajflow.data.text_image.scene_labels`) can play the detector: :class:`ShapesReader`
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

The reader is trained once per data configuration and cached (:func:`load_or_train_shapes_reader`). To make
the score interpretable it is reported together with the reader's accuracy on **held-out real images** (other
scene seeds than its training set): the score of real images is the ceiling a perfect generator would reach.
The reader sees noise-augmented images in training, since samples of small generators are noisy.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "ShapesReaderConfig",
    "ShapesReader",
    "render_shapes",
    "train_shapes_reader",
    "load_or_train_shapes_reader",
    "compositional_scores",
    "PROMPT_SEED",
    "shapes_prompts",
    "evaluate_shapes_model",
]


@dataclass
class ShapesReaderConfig:
    """Size and training of :class:`ShapesReader`.

    Attributes:
        width: Channels of the convolutional trunk.
        hidden: Features per grid cell (the Fréchet features are these, for every cell).
        train_size: Rendered training scenes.
        heldout_size: Rendered held-out scenes (accuracy report).
        epochs, batch_size, lr: Adam training.
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


def train_shapes_reader(
    make_dataset: Any,
    vocabulary: Mapping[str, list[str]],
    grid: int,
    config: ShapesReaderConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[ShapesReader, dict[str, Any]]:
    """Train a :class:`ShapesReader` on rendered scenes and report its held-out accuracy.

    Arguments:
        make_dataset: ``make_dataset(seed, length) -> ShapesDataset`` with the generator settings to read.
        vocabulary, grid: Those of the datasets.
        config: Training settings.

    Returns:
        The reader (eval mode) and a report: held-out per-cell accuracies and the
        :func:`compositional_scores` of held-out **real** images (the ceiling of any generator's score).
    """
    cfg = config or ShapesReaderConfig()
    device = torch.device(device)
    t0 = time.perf_counter()
    x, y = render_shapes(make_dataset(cfg.train_seed, cfg.train_size), progress=progress, desc="reader: render")
    xh, yh = render_shapes(make_dataset(cfg.heldout_seed, cfg.heldout_size), progress=progress, desc="held-out")
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        reader = ShapesReader(vocabulary, grid, cfg).to(device)
    opt = torch.optim.Adam(reader.parameters(), lr=cfg.lr)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    bar = tqdm(total=steps, desc="reader: train", disable=not progress, dynamic_ncols=True, leave=False)
    reader.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            # Noise of a random strength per image: generated samples are rarely clean.
            sigma = cfg.noise * torch.rand(len(idx), 1, 1, 1, generator=g).to(device)
            xb = xb + sigma * torch.randn(xb.shape, generator=g).to(device)
            logits = reader(xb)
            present = yb[..., 0] > 0
            loss = _masked_ce(logits["shape"], yb[..., 0])
            loss = loss + _masked_ce(logits["colour"], yb[..., 1], present)
            loss = loss + _masked_ce(logits["size"], yb[..., 2], present)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    reader.eval()
    pred = reader.predict(xh)
    present = yh[..., 0] > 0
    report = {
        "heldout_images": len(xh),
        "train_images": len(x),
        "heldout_cell_accuracy": float((pred[..., 0] == yh[..., 0]).float().mean()),
        "heldout_shape_accuracy": float((pred[..., 0] == yh[..., 0])[present].float().mean()),
        "heldout_colour_accuracy": float((pred[..., 1] == yh[..., 1])[present].float().mean()),
        "heldout_size_accuracy": float((pred[..., 2] == yh[..., 2])[present].float().mean()),
        "heldout_real_scores": compositional_scores(pred, yh),
        "train_seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }
    return reader, report


def load_or_train_shapes_reader(
    cache_dir: str | Path,
    data_config: Mapping[str, Any],
    config: ShapesReaderConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[ShapesReader, dict[str, Any]]:
    """A :class:`ShapesReader` for the shapes data that ``data_config`` (a ``DataConfig`` as a dict) describes,
    trained once and cached in ``cache_dir`` (``shapes-reader-<key>.safetensors`` + ``.json`` report, keyed by
    the generator settings and ``config``)."""
    from ..checkpoint import load_safetensors, save_json, save_safetensors
    from ..t2i import DataConfig, build_dataset

    cfg = config or ShapesReaderConfig()
    data = DataConfig(**dict(data_config))
    if data.name != "shapes":
        raise ValueError(f"data_config: the compositional score reads shapes scenes, got data.name={data.name!r}")
    fields = ("resolution", "grid", "max_objects", "max_groups", "shapes", "colours", "sizes", "backgrounds")
    key_src = {"data": {f: getattr(data, f) for f in fields}, "reader": asdict(cfg), "v": 1}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    weights, report_file = cache_dir / f"shapes-reader-{key}.safetensors", cache_dir / f"shapes-reader-{key}.json"
    vocabulary = build_dataset(data, length=1).vocabulary
    if weights.is_file() and report_file.is_file():
        reader = ShapesReader(vocabulary, data.grid, cfg)
        state, _ = load_safetensors(weights)
        reader.load_state_dict(state)
        return reader.to(device).eval(), json.loads(report_file.read_text())

    def make(seed: int, length: int):
        return build_dataset(data, seed=seed, length=length)

    reader, report = train_shapes_reader(make, vocabulary, data.grid, cfg, device=device, progress=progress)
    report["key"] = key_src
    save_safetensors(weights, reader.state_dict())
    save_json(report_file, report)
    return reader, report


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
    from ..t2i import DataConfig, build_dataset

    ds = build_dataset(DataConfig(**dict(data_config)), seed=seed, length=n)
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
        bundle: A :class:`~trajflow.t2i.T2IModel` trained on shapes.
        reader: The :class:`ShapesReader` for that data.

    Returns:
        ``(metrics, images, captions)``; metrics hold the :func:`compositional_scores`, ``frechet_distance``,
        ``sample_seconds`` and ``sample_images_per_s``.
    """
    from ..metrics import frechet_distance

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
    """Score the sampler's clean-image estimate after every step (:mod:`trajflow.evaluation.levels`).

    Returns one dict per step, from the first (from noise) to the last: ``level`` (``T`` .. 1), ``t`` (the
    step's start time) and the :func:`compositional_scores` of the estimates for the held-out prompts. A
    prompt whose composition is already right at an early level was decided there; the last level is the
    mean of the final step. Works for NTM (any predictor) and flow-matching bundles.
    """
    from ..model import NTM
    from ..process import time_grid
    from .levels import euler_level_estimates, ntm_level_estimates

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
