r"""Image features for Fréchet distances, trained here: no Inception, no CLIP, nothing downloaded.

FID needs an image network; the usual Inception weights are downloaded at run time by every packaged FID
(``reference/offline-data.md`` section 4), which trajflow never does. So the default features come from a
network trained locally on the data itself:

* :class:`TextImageFeatures`: a small CNN image encoder trained contrastively (CLIP's symmetric InfoNCE)
  against the frozen text encoder's pooled caption embeddings. It works for any text-image data (emoji,
  folders, shards); its image embedding gives the Fréchet features, and the cosine between an image and its
  caption is a CLIP-score stand-in (``alignment``). Its held-out retrieval accuracy is reported, so that a
  reader can tell how much it has learned.
* for the shapes data, :class:`~examples.t2i.evaluation.compositional.ShapesReader` (trained on the ground truth)
  gives per-cell features that see exactly the factors the prompts control.

Numbers from these networks compare models **evaluated with the same network** (same cache key); they are not
comparable with published FIDs. For those, :func:`torchmetrics_fid` and :func:`torchmetrics_clip_score` run
torchmetrics' FID and CLIP score when the user passes local weight paths; without them (or without
torchmetrics) they raise an error saying what is needed, and never fetch anything.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

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
from trajflow.checkpoint import check_config
from trajflow.metrics import frechet_distance
from trajflow.train import TrainerConfig

__all__ = [
    "FeatureNetConfig",
    "ImageEncoder",
    "TextImageFeatures",
    "ContrastiveLoss",
    "train_text_image_features",
    "load_or_train_text_image_features",
    "frechet_distance_of",
    "torchmetrics_fid",
    "torchmetrics_clip_score",
    "dataset_pairs",
    "evaluate_text_image_model",
]


@dataclass
class FeatureNetConfig:
    """Size and training of :class:`TextImageFeatures`.

    Attributes:
        width: Channels of the first convolution stage (doubling at each stride-2 stage).
        dim: Embedding (and Fréchet feature) width.
        epochs, batch_size, lr: AdamW training with a cosine decay to zero (through
            :class:`~trajflow.train.Trainer`; weight decay 1e-4 on matrices).
        noise: Gaussian noise of a standard deviation in ``[0, noise]`` added to training images.
        heldout_fraction: Share of the pairs kept out of training for the report.
        seed: Seed of initialisation, split and batching.
    """

    width: int = 32
    dim: int = 64
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    noise: float = 0.1
    heldout_fraction: float = 0.1
    seed: int = 0


class ImageEncoder(nn.Module):
    """A small CNN: ``(N, 3, H, W)`` in [-1, 1] -> ``(N, dim)``.

    Stride-2 stages down to at most 4x4, then pooled onto a 2x2 grid (keeping coarse layout, which global
    pooling would lose) and projected to ``dim``.

    Example:
        >>> ImageEncoder(32, width=8, dim=16)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(self, resolution: int, *, width: int = 32, dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.GELU()]
        c, side = width, resolution
        while side > 4:
            layers += [
                nn.Conv2d(c, 2 * c, 3, padding=1, stride=2),
                nn.GELU(),
                nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                nn.GELU(),
            ]
            c, side = 2 * c, math.ceil(side / 2)
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(4 * c, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.adaptive_avg_pool2d(self.trunk(x), 2).flatten(1))


class TextImageFeatures(nn.Module):
    """An image encoder aligned with frozen caption embeddings (a miniature CLIP trained on the data at hand).

    Arguments:
        resolution: Image side.
        text_dim: Width of the pooled caption embeddings it is trained against (384 for MiniLM).
        config: A :class:`FeatureNetConfig`.
    """

    def __init__(self, resolution: int, text_dim: int, config: FeatureNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeatureNetConfig()
        self.image = ImageEncoder(resolution, width=self.config.width, dim=self.config.dim)
        self.text = nn.Linear(text_dim, self.config.dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def features(self, x: Tensor) -> Tensor:
        """Image embeddings before normalisation, ``(N, dim)``: the Fréchet features."""
        return self.image(x)

    def embed_images(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x), dim=-1)

    def embed_text(self, text: Tensor) -> Tensor:
        return F.normalize(self.text(text), dim=-1)

    @torch.no_grad()
    def extract(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """:meth:`features` of many images, batched, on the CPU."""
        device = next(self.parameters()).device
        return torch.cat([self.features(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def alignment(self, images: Tensor, text: Tensor, batch_size: int = 256) -> Tensor:
        """Cosine similarity of each image with its caption embedding, ``(N,)`` (a CLIP-score stand-in)."""
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            a = self.embed_images(images[i : i + batch_size].to(device))
            b = self.embed_text(text[i : i + batch_size].to(device))
            out.append((a * b).sum(-1).cpu())
        return torch.cat(out)


def _retrieval_top1(net: TextImageFeatures, images: Tensor, text: Tensor, batch: int = 256) -> float:
    """Image -> caption retrieval accuracy within blocks of ``batch`` pairs."""
    hits, total = 0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            a = net.embed_images(images[i : i + batch])
            b = net.embed_text(text[i : i + batch])
            hits += int((a @ b.T).argmax(1).eq(torch.arange(len(a), device=a.device)).sum())
            total += len(a)
    return hits / max(total, 1)


class ContrastiveLoss:
    """CLIP's symmetric InfoNCE for :class:`TextImageFeatures`, as a :class:`~trajflow.train.Trainer` objective.

    ``batch`` is ``(images (B, 3, R, R), pooled caption embeddings (B, E))``; each image first gets Gaussian noise
    of a standard deviation drawn in ``[0, noise]``. The other pairs of the batch are the negatives.
    """

    loss_name = "contrastive_loss"

    def __init__(self, noise: float) -> None:
        self.noise = noise

    def __call__(
        self, model: TextImageFeatures, batch: tuple[Tensor, Tensor], generator: torch.Generator, step: int
    ) -> Tensor:
        x, text = batch
        x = noise_augment(x, self.noise, generator)
        logits = model.logit_scale.exp().clamp(max=100) * model.embed_images(x) @ model.embed_text(text).T  # (B, B)
        target = torch.arange(len(x), device=x.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _trainer_config(cfg: FeatureNetConfig, n_train: int, progress: bool, device: torch.device) -> TrainerConfig:
    """AdamW (weight decay 1e-4), no warmup, a cosine decay to zero over ``epochs`` epochs."""
    batch = min(cfg.batch_size, n_train)
    max_steps = cfg.epochs * max(1, n_train // batch)
    return evaluator_trainer_config(
        max_steps, batch, cfg.lr, cfg.seed, weight_decay=1e-4, progress=progress, device=device
    )


def train_text_image_features(
    images: Tensor,
    text: Tensor,
    config: FeatureNetConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    out_dir: str | Path | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> tuple[TextImageFeatures, dict[str, Any]]:
    """Train :class:`TextImageFeatures` with :class:`~trajflow.train.Trainer` on pairs ``images (N, 3, R, R)`` /
    ``text (N, E)`` (pooled caption embeddings).

    A seeded ``heldout_fraction`` of the pairs is kept out of training. ``out_dir`` is the Trainer's output folder
    (its checkpoint holds the network; ``None``: a temporary one) and ``run_config`` is saved with the checkpoint
    (default: the config and the two widths).

    Returns:
        The network (eval mode, on ``device``) and a report with held-out retrieval accuracy and alignments.
    """
    cfg = config or FeatureNetConfig()
    device = torch.device(device)
    if images.dim() != 4 or text.dim() != 2 or len(images) != len(text):
        raise ValueError(
            f"images, text: expected (N, 3, R, R) and (N, E) tensors of the same N, got {tuple(images.shape)} "
            f"and {tuple(text.shape)}"
        )
    t0 = time.perf_counter()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    n_held = max(1, int(len(images) * cfg.heldout_fraction)) if len(images) > 10 else 0
    held, train = perm[:n_held], perm[n_held:]
    dims = {"resolution": int(images.shape[-1]), "text_dim": int(text.shape[-1])}
    net, result = fit_evaluator(
        lambda: TextImageFeatures(dims["resolution"], dims["text_dim"], cfg),
        ContrastiveLoss(cfg.noise),
        TensorDataset(images[train], text[train]),
        _trainer_config(cfg, len(train), progress, device),
        {"features": asdict(cfg), "model": dims} if run_config is None else run_config,
        out_dir=out_dir,
        device=device,
    )
    report: dict[str, Any] = {"train_pairs": len(train), "heldout_pairs": int(n_held), "config": asdict(cfg)}
    if n_held:
        xh, th = images[held].to(device), text[held].to(device)
        report["heldout_retrieval_top1"] = _retrieval_top1(net, xh, th, batch=min(256, n_held))
        report["heldout_retrieval_chance"] = 1.0 / min(256, n_held)
        report["heldout_alignment_matched"] = float(net.alignment(xh, th).mean())
        report["heldout_alignment_shuffled"] = float(net.alignment(xh, th.roll(1, 0)).mean())
    report.update(dims, train_steps=result.step, train_loss=result.loss, train_seconds=time.perf_counter() - t0)
    return net, report


def load_or_train_text_image_features(
    cache_dir: str | Path,
    key: Mapping[str, Any],
    make_pairs: Callable[[], tuple[Tensor, Tensor]],
    config: FeatureNetConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[TextImageFeatures, dict[str, Any]]:
    """:func:`train_text_image_features` once per ``key`` (a JSON-able description of the data and text
    encoder) and ``config``, cached in ``cache_dir`` as the Trainer's output folder ``features-<digest>/`` (see
    :mod:`~examples.t2i.evaluation.evaluator_cache`). ``make_pairs()`` is only called when training is needed.

    An entry whose checkpoint was written for another key or config raises a ``ValueError`` naming the
    differing fields.
    """
    cfg = config or FeatureNetConfig()
    src = {"data": dict(key), "features": asdict(cfg), "v": CACHE_VERSION}
    folder = entry_dir(cache_dir, "features", src)
    found = cached_config(folder)
    if found is not None:
        check_config(src, found, ignore=("train.", "model."), source=f"the cached features {str(folder)!r}")
        # The network's widths come from the data it was trained on, so they are read from the checkpoint.
        dims = {k: int(found["model"][k]) for k in ("resolution", "text_dim")}
        net = TextImageFeatures(dims["resolution"], dims["text_dim"], cfg)
        return net, load_evaluator(folder, net, {**src, "model": dims}, device)
    images, text = make_pairs()
    dims = {"resolution": int(images.shape[-1]), "text_dim": int(text.shape[-1])}
    net, report = train_text_image_features(
        images, text, cfg, device=device, progress=progress, out_dir=folder, run_config={**src, "model": dims}
    )
    report["key"] = src
    save_report(folder, report)
    return net, report


def frechet_distance_of(extract: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between the features that ``extract`` gives two image sets.

    Computed by :func:`trajflow.metrics.frechet_distance` in float64.

    Example:
        >>> x = torch.randn(64, 3, 8, 8)
        >>> frechet_distance_of(lambda im: im.flatten(1)[:, :4], x, x) < 1e-6
        True
    """
    return frechet_distance(extract(real).double(), extract(fake).double())


# ------------------------------------------------------------------------------------------------ torchmetrics
def _local_path(path: str | os.PathLike | None, what: str, flag: str) -> Path:
    if path is None:
        raise ValueError(
            f"{what}: needs weights on disk, passed as {flag} PATH; trajflow never downloads them (use the locally "
            f"trained features of examples.t2i.evaluation.features instead when you have none)"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what}: {flag} {str(p)!r} does not exist (it must be a local file or folder)")
    return p


def _torchmetrics(what: str) -> Any:
    try:
        import torchmetrics
    except ImportError as e:
        raise ImportError(f"{what}: needs torchmetrics: pip install torchmetrics (plus torch-fidelity for FID)") from e
    return torchmetrics


@contextmanager
def _offline():
    """Forbid hub downloads while a third-party metric loads its weights."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def torchmetrics_fid(
    real: Tensor, fake: Tensor, weights_path: str | os.PathLike | None, *, device: str = "cpu", batch_size: int = 64
) -> float:
    """Standard FID (torchmetrics, Inception features) from **local** Inception weights.

    Arguments:
        real, fake: ``(N, 3, H, W)`` in ``[-1, 1]``.
        weights_path: The FID Inception weights file (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``),
            passed to torchmetrics' ``feature_extractor_weights_path``.

    Raises ``ValueError`` / ``FileNotFoundError`` without a local path and ``ImportError`` without torchmetrics.
    """
    path = _local_path(weights_path, "FID", "--fid-weights")
    tm = _torchmetrics("FID")
    with _offline():
        metric = tm.image.fid.FrechetInceptionDistance(
            feature=2048, normalize=True, feature_extractor_weights_path=str(path)
        ).to(device)
        for images, is_real in ((real, True), (fake, False)):
            for i in range(0, len(images), batch_size):
                metric.update(((images[i : i + batch_size] + 1) / 2).clamp(0, 1).to(device), real=is_real)
        return float(metric.compute())


def torchmetrics_clip_score(
    images: Tensor,
    captions: list[str],
    model_path: str | os.PathLike | None,
    *,
    device: str = "cpu",
    batch_size: int = 64,
) -> float:
    """CLIP score (torchmetrics) with a CLIP model from a **local** ``transformers`` folder.

    Arguments:
        images: ``(N, 3, H, W)`` in ``[-1, 1]``.
        captions: ``N`` prompts.
        model_path: A local folder holding a CLIP model and its processor (e.g. a saved
            ``openai/clip-vit-base-patch16``).
    """
    path = _local_path(model_path, "CLIP score", "--clip-model")
    tm = _torchmetrics("CLIP score")
    with _offline():
        metric = tm.multimodal.clip_score.CLIPScore(model_name_or_path=str(path)).to(device)
        for i in range(0, len(images), batch_size):
            pix = ((images[i : i + batch_size] + 1) * 127.5).clamp(0, 255).to(torch.uint8).to(device)
            metric.update(pix, list(captions[i : i + batch_size]))
        return float(metric.compute())


def dataset_pairs(
    dataset: Any, encoder: Any, n: int | None = None, *, seed: int = 0, progress: bool = False
) -> tuple[Tensor, Tensor, list[str]]:
    """Images ``(N, 3, R, R)``, pooled caption embeddings ``(N, E)`` and captions of a map-style text-image
    dataset (all items, or ``n`` of them in a seeded random order)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    if n is not None:
        order = order[:n]
    images, captions = [], []
    for i in tqdm(order, desc="read pairs", disable=not progress, dynamic_ncols=True, leave=False):
        item = dataset[i]
        images.append(item["image"])
        captions.append(item["caption"])
    text = []
    for i in range(0, len(captions), 256):
        _, _, pooled = encoder.encode(captions[i : i + 256], pooled=True)
        text.append(pooled.float().cpu())
    return torch.stack(images), torch.cat(text), captions


def evaluate_text_image_model(
    bundle: Any,
    net: TextImageFeatures,
    real: Tensor,
    captions: list[str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], Tensor]:
    """Generate one image per caption and compare with the real images of the same captions: Fréchet distance on
    ``net``'s features and the image-caption alignment of generated vs real images."""
    t0 = time.perf_counter()
    images = bundle.generate(
        captions, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, progress=progress
    )
    seconds = time.perf_counter() - t0
    _, _, text = bundle.encoder.encode(captions, pooled=True)
    text = text.float().cpu()
    metrics = {
        "frechet_distance": frechet_distance(net.extract(real).double(), net.extract(images).double()),
        "alignment": float(net.alignment(images, text).mean()),
        "alignment_real": float(net.alignment(real, text).mean()),
        "n": len(captions),
        "sample_seconds": seconds,
        "sample_images_per_s": len(captions) / max(seconds, 1e-9),
    }
    return metrics, images
