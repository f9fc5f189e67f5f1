"""Toy 2-D densities: shapes, dtype, determinism, scale, labels, registry errors; exact bin masses and the
checkerboard's support."""

import math
import time

import pytest
import torch

import trajflow.data.toy.masses as toy_masses
from trajflow.data import TOY_DENSITIES, ToyDensity, toy_density
from trajflow.metrics import histogram_distance

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


# --- exact bin masses and support -------------------------------------------------------------------------

EDGES = torch.linspace(-4.5, 4.5, 37)  # the toy job's grid (examples/toy/evaluate.py's HISTOGRAM_EDGES)


@pytest.mark.parametrize("name", NAMES)
def test_bin_masses_match_a_large_sample(name):
    """The exact (closed-form or quadrature) masses agree with 400k samples up to their sampling floor, so a
    wrong geometry or a coarse quadrature would show."""
    d = toy_density(name)
    assert d.exact_bin_masses
    p = d.bin_masses(EDGES)
    assert p.shape == (36, 36) and p.dtype == torch.float64 and bool((p >= 0).all())
    assert 0.999 < float(p.sum()) <= 1.0 + 1e-9  # pinwheel's rare tails leave a little mass outside the grid
    n = 400_000
    x = d.sample(n, generator=torch.Generator().manual_seed(1))
    floor = float((p / (2 * math.pi * n)).sqrt().sum())  # a perfect match's expected distance, about 0.01
    assert histogram_distance(x, p, EDGES) < 1.1 * floor


def test_bin_masses_closed_forms():
    # Checkerboard on a grid aligned with its squares: 1/8 of the mass over 36 bins per dark square, 0 elsewhere.
    d = toy_density("checkerboard")
    centres = (EDGES[1:] + EDGES[:-1]) / 2
    dark = d.in_support(torch.cartesian_prod(centres, centres)).reshape(36, 36)
    assert int(dark.sum()) == 8 * 36
    assert torch.allclose(d.bin_masses(EDGES), dark.double() / 288, rtol=0, atol=1e-15)
    # Eight Gaussians on one bin per half plane: the symmetric mixture puts 1/4 in each quadrant.
    q = toy_density("eight_gaussians").bin_masses(torch.tensor([-50.0, 0.0, 50.0]))
    assert torch.allclose(q, torch.full((2, 2), 0.25, dtype=torch.float64), atol=1e-12)
    # Rings: the mass within a circle-bounding square of the innermost ring is at least that ring's 1/4.
    r = toy_density("rings").bin_masses(torch.tensor([-1.0, 1.0]))
    assert 0.25 < float(r.sum()) < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_moons", "spirals", "rings", "pinwheel"])
def test_bin_mass_quadrature_converged(name, monkeypatch):
    """The documented accuracy: 4x the quadrature nodes moves the masses by less than 5e-5 in total variation."""
    p = toy_density(name).bin_masses(EDGES)
    monkeypatch.setattr(toy_masses, "_NODES", 4 * toy_masses._NODES)
    finer = toy_density(name).bin_masses(EDGES)
    assert 0.5 * float((p - finer).abs().sum()) < 5e-5


def test_bin_masses_without_a_cdf_come_from_samples():
    sampled = ToyDensity("board", TOY_DENSITIES["checkerboard"]._sampler)
    assert not sampled.exact_bin_masses and not sampled.bounded_support
    p = sampled.bin_masses(EDGES)
    # 2^22 samples: a Monte-Carlo error of about 0.003 in total variation, against the exact masses.
    assert 0.5 * float((p - toy_density("checkerboard").bin_masses(EDGES)).abs().sum()) < 0.006


@pytest.mark.parametrize(
    "edges, match",
    [
        (torch.tensor([1.0, 0.0]), "edges: expected strictly ascending"),
        (torch.zeros(2, 2), "edges: expected a 1-D tensor"),
        (torch.tensor([0.0, float("nan")]), "edges: expected finite"),
        ((0.0, 1.0), "edges: expected a torch.Tensor"),
    ],
)
def test_bin_masses_bad_edges(edges, match):
    with pytest.raises(ValueError, match=match):
        toy_density("rings").bin_masses(edges)


def test_checkerboard_support():
    d = toy_density("checkerboard")
    assert d.bounded_support and not toy_density("spirals").bounded_support
    x = d.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert bool(d.in_support(x).all())
    # Shifted by one square, the sample lands on the light squares (and off the board): none inside but on
    # the shared edges, a set of measure zero.
    assert float(d.in_support(x + torch.tensor([1.5, 0.0])).double().mean()) < 1e-3
    # Closed squares: corners and edges of a dark square count.
    edge_points = torch.tensor([[-3.0, -3.0], [-1.5, -2.0], [3.0, 3.0], [3.01, 3.0], [0.0, 0.0]])
    assert d.in_support(edge_points).tolist() == [True, True, True, False, True]
    assert d.in_support(edge_points.double()).dtype == torch.bool


def test_in_support_errors():
    with pytest.raises(ValueError, match="'spirals' has no bounded support.*checkerboard"):
        toy_density("spirals").in_support(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"x: expected a tensor of shape \(n, 2\)"):
        toy_density("checkerboard").in_support(torch.zeros(3))
    with pytest.raises(ValueError, match="x: expected a torch.Tensor"):
        toy_density("checkerboard").in_support([[0.0, 0.0]])
