"""The few-step benchmark's reader: a small digit classifier whose penultimate features define FD, KID and
k-NN precision/recall, computed by torchmetrics and prdc rather than by hand.

The classifier is trained by :class:`trajflow.train.Trainer` on the training split (dequantised images in
[-1, 1), cross-entropy) and cached by its config and a hash of the data, so that every row of a benchmark,
and every re-run, is read by the same network. Its test accuracy is recorded with the results.

Example:
    >>> net = DigitClassifier(image_shape=(1, 14, 14))
    >>> net.features(torch.zeros(3, 1, 14, 14)).shape
    torch.Size([3, 128])
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trajflow.likelihood import dequantize
from trajflow.train import Trainer, TrainerConfig

__all__ = ["ReaderConfig", "DigitClassifier", "FeatureExtractor", "load_or_train_reader", "SampleMetrics"]


@dataclass(frozen=True)
class ReaderConfig:
    """How the reader is trained (part of its cache key)."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    width: int = 32
    features: int = 128
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    noise: float = 0.05  # Gaussian noise added in training, so that slightly noisy samples read as their digit
    seed: int = 0


class DigitClassifier(nn.Module):
    """Two conv stages (3x3 convs, SiLU, 2x2 average pooling), then ``features`` -> 10 logits."""

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), width: int = 32, features: int = 128) -> None:
        super().__init__()
        c, w = image_shape[0], width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU()
            )

        self.body = nn.Sequential(
            stage(c, w), nn.AvgPool2d(2), stage(w, 2 * w), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(3), nn.Flatten()
        )
        self.proj = nn.Sequential(nn.Linear(2 * w * 9, features), nn.SiLU())
        self.logits = nn.Linear(features, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, features)`` of images ``(N, C, H, W)`` in [-1, 1]."""
        return self.proj(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.features(x))


class FeatureExtractor(nn.Module):
    """The classifier's features as a torchmetrics ``feature=`` module (it reads ``num_features``)."""

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.proj[0].out_features

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.classifier.features(c.float()) for c in x.split(500)]).double()


@dataclass
class _CrossEntropy:
    levels: int
    noise: float
    loss_name: str = "cross_entropy"

    def __call__(self, model: nn.Module, batch: Any, generator: torch.Generator, step: int) -> Tensor:
        images, labels = batch
        x = dequantize(images, self.levels, generator)
        x = x + self.noise * torch.randn(x.shape, generator=generator, device=x.device)
        return F.cross_entropy(model(x), labels)


def _data_hash(images: Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def accuracy(classifier: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``classifier`` on images ``x`` in [-1, 1]."""
    pred = torch.cat([classifier(c).argmax(-1) for c in x.split(1000)])
    return float((pred == labels).float().mean())


def load_or_train_reader(
    cfg: ReaderConfig, train_set: Any, test_x: Tensor, test_labels: Tensor, cache: Path
) -> tuple[DigitClassifier, dict[str, Any]]:
    """The cached classifier for ``cfg`` and this training data, trained first if absent.

    Returns ``(classifier, info)`` with ``info`` holding ``test_accuracy``, the cache key and the data hash.
    """
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    data_hash = _data_hash(train_set.images)
    folder = cache / f"reader-{key}-{data_hash}"
    net = DigitClassifier(cfg.image_shape, cfg.width, cfg.features)
    weights = folder / "reader.safetensors"
    if not weights.exists():
        tcfg = TrainerConfig(
            max_steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            warmup_steps=min(100, cfg.steps // 10),
            ema_decay=0.0,
            seed=cfg.seed,
            checkpoint_every=cfg.steps,
            log_every=100,
            cpu=True,
        )
        Trainer(tcfg, folder / "train").fit(net, _CrossEntropy(train_set.levels, cfg.noise), train_set, resume=True)
        tmp = weights.with_suffix(".tmp")
        save_file(net.state_dict(), tmp)
        os.replace(tmp, weights)  # atomic: a killed run leaves no half-written reader
    net.load_state_dict(load_file(weights))
    net.eval().requires_grad_(False)
    return net, {"test_accuracy": accuracy(net, test_x, test_labels), "key": key, "data_hash": data_hash}


class SampleMetrics:
    """FD, KID (torchmetrics) and k-NN precision/recall (prdc, Kynkaanniemi et al. 2019) against fixed real
    images, all in the reader's feature space. The real features are computed once.

    Arguments:
        classifier: The trained reader.
        real: Real images ``(N, C, H, W)`` in [-1, 1] (the benchmark uses 5,000 test images).
        nearest_k: The ``k`` of the k-NN precision/recall manifolds.
    """

    def __init__(self, classifier: DigitClassifier, real: Tensor, nearest_k: int = 5) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.extract = FeatureExtractor(classifier)
        self.fid = FrechetInceptionDistance(feature=self.extract, reset_real_features=False)
        self.fid.update(real, real=True)
        self.real_features = self.extract(real).float().numpy()
        self.real = real
        self.nearest_k = nearest_k

    def frechet_distance(self, fake: Tensor) -> float:
        self.fid.reset()
        self.fid.update(fake.clamp(-1, 1), real=False)
        return float(self.fid.compute())

    def all(self, fake: Tensor, kid_subset: int = 1000) -> dict[str, float]:
        """``frechet_distance``, ``kid`` (mean over 100 subsets), ``precision``, ``recall``, ``density`` and
        ``coverage`` of ``fake``."""
        from prdc import compute_prdc
        from torchmetrics.image.kid import KernelInceptionDistance

        fake = fake.clamp(-1, 1)
        kid = KernelInceptionDistance(feature=self.extract, subset_size=min(kid_subset, len(fake), len(self.real)))
        kid.update(self.real, real=True)
        kid.update(fake, real=False)
        kid_mean, _ = kid.compute()
        prdc = compute_prdc(self.real_features, self.extract(fake).float().numpy(), nearest_k=self.nearest_k)
        return {
            "frechet_distance": self.frechet_distance(fake),
            "kid": float(kid_mean),
            **{k: float(np.asarray(v)) for k, v in prdc.items()},
        }
