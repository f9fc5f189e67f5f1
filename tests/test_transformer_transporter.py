"""Tests of the TarFlow-style image transporter and the shared transformer layers it is built from."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from trajflow.nn.patches import patch_grid, patchify, unpatchify
from trajflow.nn.transformer import KVCache, RotaryEmbedding2D, Transformer, apply_rotary
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig

pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install 'trajflow[dev]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(deadline=None, max_examples=4, derandomize=True)


def make(
    image_shape: tuple[int, int, int] = (1, 4, 4),
    patch_size: int = 1,
    *,
    seed: int = 0,
    perturb: float = 0.1,
    dtype: torch.dtype = torch.float32,
    **kwargs: object,
) -> TransformerTransporter:
    """A tiny transporter whose zero heads are replaced by small random ones (so it is not the identity)."""
    torch.manual_seed(seed)
    cfg = dict(width=16, heads=2, layers_per_block=1, blocks=2, time_features=8)
    cfg.update(kwargs)
    f = TransformerTransporter(TransformerTransporterConfig(image_shape, patch_size, **cfg))
    if perturb:
        for block in f.blocks:
            torch.nn.init.normal_(block.head.weight, std=perturb)
            torch.nn.init.normal_(block.head.bias, std=perturb)
    return f.to(dtype)


# ----------------------------------------------------------------------------------------- shared layers


def test_patchify_roundtrip_and_order() -> None:
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (1, 6, 8)
    # Token 1 is the patch at (row 0, col 1); channels ordered (c, dy, dx) like F.unfold.
    unfold = torch.nn.functional.unfold(x, kernel_size=2, stride=2).transpose(1, 2)
    assert torch.equal(tokens, unfold)
    assert torch.equal(unpatchify(tokens, 2, (2, 4, 6)), x)
    assert patch_grid(4, 6, 2).tolist()[1] == [0.0, 1.0]


def test_rope_is_relative() -> None:
    """q.k after rotation depends on the positions only through their difference."""
    torch.manual_seed(0)
    rope = RotaryEmbedding2D(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq: list[float], pk: list[float]) -> torch.Tensor:
        rq, rk = rope(torch.tensor([pq])), rope(torch.tensor([pk]))
        return (apply_rotary(q, rq) * apply_rotary(k, rk)).sum()

    torch.testing.assert_close(score([1, 2], [3, 0]), score([4, 7], [6, 5]))
    assert not torch.allclose(score([1, 2], [3, 0]), score([1, 2], [0, 3]))


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_kv_cache_matches_causal_pass(static: bool, kv_heads: int | None) -> None:
    torch.manual_seed(0)
    net = Transformer(16, depth=2, heads=2, kv_heads=kv_heads)
    x = torch.randn(2, 5, 16)
    rope = RotaryEmbedding2D(8)(patch_grid(1, 5, 1))
    with torch.no_grad():
        full = net(x, rope, causal=True)
        caches = net.make_caches(5 if static else None)
        # One token, then a chunk of three (exercises the offset causal mask), then one.
        pieces = []
        for a, b in [(0, 1), (1, 4), (4, 5)]:
            pieces.append(net(x[:, a:b], (rope[0][a:b], rope[1][a:b]), causal=True, caches=caches))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_static_cache_overflow() -> None:
    cache = KVCache(max_len=1)
    cache.append(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="max_len"):
        cache.append(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


# ------------------------------------------------------------------------------------------- transporter


def test_identity_at_init() -> None:
    f = make(perturb=0.0)
    x, t = torch.randn(3, 1, 4, 4), torch.rand(3)
    u, ladj = f(x, t)
    assert torch.equal(u, x)
    assert torch.equal(ladj, torch.zeros(3))
    assert torch.equal(f.inverse(u, t), x)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
    patch=st.sampled_from([1, 2]),
    kv_heads=st.sampled_from([None, 1]),
)
def test_roundtrip(seed: int, batch: int, patch: int, kv_heads: int | None) -> None:
    f = make((2, 4, 4), patch, seed=seed, kv_heads=kv_heads)
    x, t = torch.randn(batch, 2, 4, 4), torch.rand(batch)
    u, ladj = f(x, t)
    assert u.shape == x.shape and ladj.shape == (batch,) and ladj.dtype == torch.float32
    assert (u - x).abs().max() > 1e-2  # the perturbed transporter is not the identity
    with torch.no_grad():
        torch.testing.assert_close(f.inverse(u, t), x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.inverse(u, t), x, rtol=1e-4, atol=1e-4)  # growing cache, with grad


@SETTINGS
@given(seed=st.integers(0, 2**16), patch=st.sampled_from([1, 2]))
def test_kv_inverse_equals_naive(seed: int, patch: int) -> None:
    f = make((1, 4, 4), patch, seed=seed, perturb=0.3, layers_per_block=2)
    u, t = torch.randn(2, 1, 4, 4), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(f.inverse(u, t), f.inverse_naive(u, t), rtol=1e-5, atol=1e-5)


def test_float64_inverse_is_exact() -> None:
    """In float64 the cached and naive inverses agree with x to rounding (nothing is done in float32)."""
    f = make((2, 4, 4), 2, seed=12, perturb=0.3, layers_per_block=2, kv_heads=1, dtype=torch.float64)
    x, t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    u, _ = f(x, t)
    with torch.no_grad():
        torch.testing.assert_close(f.inverse(u, t), x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f.inverse_naive(u, t), x, rtol=1e-12, atol=1e-12)


def _jacobian(fn: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(fn, v, vectorize=True)


@settings(deadline=None, max_examples=3, derandomize=True)
@given(seed=st.integers(0, 2**16), t=st.floats(0.0, 1.0))
def test_logdet_matches_autograd_jacobian(seed: int, t: float) -> None:
    f = make((1, 4, 4), 1, seed=seed, perturb=0.3, dtype=torch.float64)
    x = torch.randn(1, 4, 4, dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    jac = _jacobian(lambda v: f(v.reshape(1, 4, 4), tt)[0].reshape(-1), x.reshape(-1))  # (16, 16)
    _, ladj = f(x, tt)  # unbatched: x (C, H, W), t ()
    assert ladj.shape == () and ladj.dtype == torch.float64
    # Not bit-exact: slogdet of the (non-triangular) product of the two blocks' Jacobians has LU error.
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1], rtol=1e-6, atol=1e-6)


def test_inverse_logdet_is_opposite() -> None:
    """The Jacobian of the KV-cached inverse at u has log|det| = -ladj(x)."""
    f = make((1, 4, 4), 2, seed=11, perturb=0.3, dtype=torch.float64)
    x, t = torch.randn(1, 4, 4, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    u, ladj = f(x, t)
    jac_inv = _jacobian(lambda v: f.inverse(v.reshape(1, 4, 4), t).reshape(-1), u.detach().reshape(-1))
    torch.testing.assert_close(torch.linalg.slogdet(jac_inv)[1], -ladj, rtol=1e-6, atol=1e-6)


def test_one_block_is_autoregressive() -> None:
    """A single identity-order block has a lower-triangular Jacobian in raster token order."""
    f = make((1, 3, 3), 1, seed=1, perturb=0.3, blocks=1, dtype=torch.float64)
    x, t = torch.randn(1, 3, 3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    jac = _jacobian(lambda v: f(v.reshape(1, 3, 3), t)[0].reshape(-1), x.reshape(-1))
    assert torch.equal(jac, jac.tril())
    torch.testing.assert_close(jac[0, 0], torch.tensor(1.0, dtype=torch.float64))  # token 0 untouched
    assert jac[1:].tril(-1).abs().sum() > 0


def test_depends_on_time() -> None:
    f = make(seed=3, perturb=0.2)
    x = torch.randn(1, 1, 4, 4).expand(2, 1, 4, 4)
    u, ladj = f(x, torch.tensor([0.1, 0.9]))
    assert not torch.allclose(u[0], u[1]) and not torch.allclose(ladj[0], ladj[1])


def test_leading_batch_dims() -> None:
    f = make(seed=4)
    x, t = torch.randn(2, 3, 1, 4, 4), torch.rand(2, 3)
    u, ladj = f(x, t)
    assert u.shape == x.shape and ladj.shape == (2, 3)
    u0, ladj0 = f(x[1], t[1])
    torch.testing.assert_close(u[1], u0)
    torch.testing.assert_close(ladj[1], ladj0)
    torch.testing.assert_close(f.inverse(u, t), x, rtol=1e-4, atol=1e-4)


def test_torch_transform_roundtrip_and_ladj() -> None:
    f = make(seed=5)
    t = torch.rand(3)
    transform = f.transform(t)
    x = torch.randn(2, 3, 1, 4, 4)  # (sample, batch, C, H, W)
    y = transform(x)
    _, ladj = f(x, t.expand(2, 3))
    torch.testing.assert_close(transform.inv(y), x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), ladj)
    # Forward and inverse log-determinants cancel.
    total = transform.inv.log_abs_det_jacobian(y, x) + transform.log_abs_det_jacobian(x, y)
    torch.testing.assert_close(total, torch.zeros(2, 3))


def test_bf16_autocast() -> None:
    f = make(seed=6, perturb=0.02)
    x, t = torch.randn(2, 1, 4, 4), torch.rand(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, ladj = f(x, t)
        with torch.no_grad():
            xr = f.inverse(u, t)
    assert u.dtype == torch.float32 and ladj.dtype == torch.float32
    assert torch.isfinite(xr).all() and (xr - x).abs().max() < 0.1


def test_single_token_is_identity() -> None:
    f = make((1, 2, 2), 2, seed=7, perturb=0.5)
    x, t = torch.randn(2, 1, 2, 2), torch.rand(2)
    u, ladj = f(x, t)
    assert torch.equal(u, x) and torch.equal(ladj, torch.zeros(2))
    assert torch.equal(f.inverse(u, t), x)


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs() -> None:
    f = make()
    t = torch.rand(2)
    with pytest.raises(ValueError, match=r"x: expected images of size 4x4, got 4x5"):
        f(torch.randn(2, 1, 4, 5), t)
    with pytest.raises(ValueError, match=r"x: expected 1 channels"):
        f(torch.randn(2, 3, 4, 4), t)
    with pytest.raises(ValueError, match=r"u: expected images of size"):
        f.inverse(torch.randn(2, 1, 2, 2), t)
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        f(torch.randn(2, 1, 4, 4), torch.rand(3))
    with pytest.raises(ValueError, match=r"t: expected times in \[0.0, 1.0\]"):
        f(torch.randn(2, 1, 4, 4), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"x: expected a floating-point tensor"):
        f(torch.zeros(2, 1, 4, 4, dtype=torch.long), t)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="patch_size: expected a positive divisor"):
        TransformerTransporterConfig((1, 4, 4), patch_size=3)
    with pytest.raises(ValueError, match="heads: expected width / heads"):
        TransformerTransporterConfig((1, 4, 4), width=24, heads=4)
    with pytest.raises(ValueError, match="kv_heads: expected a divisor"):
        TransformerTransporterConfig((1, 4, 4), width=32, heads=4, kv_heads=3)
