"""Toy 2-D densities: shapes, dtype, determinism, scale, labels, registry errors."""

import time

import pytest
import torch

from trajflow.data import TOY_DENSITIES, ToyDensity, toy_density

NAMES = sorted(TOY_DENSITIES)
REQUIRED = {"eight_gaussians", "two_moons", "checkerboard", "spirals", "pinwheel", "rings", "class_mixture"}


def test_registry_has_required_names():
    assert REQUIRED <= set(TOY_DENSITIES)
    assert all(isinstance(d, ToyDensity) and d.name == k for k, d in TOY_DENSITIES.items())


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_finite(name):
    x = toy_density(name).sample(1000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1000, 2) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all())
    assert toy_density(name).sample(0).shape == (0, 2)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_generator(name):
    d = toy_density(name)
    a = d.sample(500, generator=torch.Generator().manual_seed(3))
    b = d.sample(500, generator=torch.Generator().manual_seed(3))
    c = d.sample(500, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_documented_scale(name):
    x = toy_density(name).sample(20000, generator=torch.Generator().manual_seed(1))
    std = x.std(dim=0)
    assert bool((std > 0.9).all()) and bool((std < 2.1).all()), std
    assert x.mean(dim=0).abs().max() < 0.1
    # "roughly within [-4, 4]": pinwheel's exponential twist leaves a few points slightly outside.
    assert (x.abs() > 4).any(dim=1).float().mean() < 1e-3


def test_specific_geometry():
    g = torch.Generator().manual_seed(0)
    r = toy_density("rings").sample(4000, generator=g).norm(dim=1)
    # Radii cluster at 0.75, 1.5, 2.25, 3.0 with noise std 0.08.
    nearest = (r[:, None] - torch.tensor([0.75, 1.5, 2.25, 3.0])).abs().min(dim=1).values
    assert nearest.max() < 0.5
    x = toy_density("checkerboard").sample(4000, generator=g)
    assert x.abs().max() <= 3.0
    cells = torch.floor((x + 3.0) / 1.5).long()
    assert bool(((cells[:, 0] + cells[:, 1]) % 2 == 0).all())  # only the dark squares


def test_class_mixture_labels():
    d = toy_density("class_mixture")
    assert d.num_classes == 8 and d.conditional
    x, y = d.sample_labeled(8000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8000, 2) and y.shape == (8000,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 8
    assert torch.bincount(y, minlength=8).min() > 800  # every class present, roughly balanced
    # The label is the mixture component: samples sit near the centre at angle 2 pi k / 8, radius 2.5.
    angle = y.double() * (2 * torch.pi / 8)
    centres = 2.5 * torch.stack([angle.cos(), angle.sin()], dim=1)
    assert (x.double() - centres).norm(dim=1).max() < 1.5
    x2, y2 = d.sample_labeled(8000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("name", [n for n in NAMES if not TOY_DENSITIES[n].conditional])
def test_unconditional_have_no_labels(name):
    d = toy_density(name)
    assert d.num_classes == 0
    with pytest.raises(ValueError, match="unconditional"):
        d.sample_labeled(4)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="two_moons") as info:
        toy_density("moons")
    assert "moons" in str(info.value)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_bad_n(n):
    with pytest.raises(ValueError, match="n:"):
        toy_density("spirals").sample(n)


def test_bad_generator():
    with pytest.raises(ValueError, match="generator"):
        toy_density("spirals").sample(3, generator=0)


def test_vectorised_speed():
    t0 = time.perf_counter()
    for name in NAMES:
        toy_density(name).sample(100_000, generator=torch.Generator().manual_seed(0))
    # "well under a second" each; generous for a shared 2-core CI machine.
    assert (time.perf_counter() - t0) / len(NAMES) < 1.0
