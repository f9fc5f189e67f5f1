"""The static-cache inverse of the transformer transporter (issue 10): fixed shapes, same answer.

``method="static"`` writes keys/values in place at a position held in a device tensor and attends over
the whole preallocated cache under a mask; it must equal the eager KV-cache inverse and the naive one to
float rounding (tight tolerances: 1e-5 in float32, 1e-10 in float64), for both scan orders, grouped-query
attention and every kind of time input, and invert ``forward``. The CUDA-graph replay is checked against
it when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

import trajflow.nn.transformer as tfm
from trajflow.nn.patches import patch_grid
from trajflow.nn.transformer import RotaryEmbedding2D, StaticKVCache, Transformer, grouped_attention
from trajflow.transporters import StaticCacheInverse
from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make(
    image_shape: tuple[int, int, int] = (2, 6, 4),
    patch_size: int = 2,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **kwargs: object,
) -> TransformerTransporter:
    """A small transporter with random (non-identity) heads."""
    torch.manual_seed(seed)
    cfg = dict(width=32, heads=4, layers_per_block=2, blocks=2, time_features=8)
    cfg.update(kwargs)
    f = TransformerTransporter(TransformerTransporterConfig(image_shape, patch_size, **cfg))
    for block in f.blocks:
        torch.nn.init.normal_(block.head.weight, std=0.1)
        torch.nn.init.normal_(block.head.bias, std=0.1)
    return f.to(dtype).eval()


def times(kind: str, batch: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if kind == "random":
        return torch.rand(batch, dtype=dtype)
    if kind == "shared":
        return torch.full(batch, 0.37, dtype=dtype)
    # the end points of a grid: t = 0 (data) and t = 1 (noise), alternating
    return (torch.arange(torch.Size(batch).numel()) % 2).to(dtype).reshape(batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_static_equals_eager_and_naive(dtype: torch.dtype, kv_heads: int | None, blocks: int) -> None:
    """blocks=2 is identity + flip; 3 repeats the identity order after the flip."""
    f = make(dtype=dtype, kv_heads=kv_heads, blocks=blocks)
    x = torch.randn(3, *f.event_shape, dtype=dtype)
    t = torch.rand(3, dtype=dtype)
    with torch.no_grad():
        u, _ = f(x, t)
        static = f.inverse(u, t, method="static")
        eager = f.inverse(u, t)  # the default, "kv-cache"
        naive = f.inverse(u, t, method="naive")
    assert static.dtype == eager.dtype == dtype
    torch.testing.assert_close(static, eager, **TOL[dtype])
    torch.testing.assert_close(static, naive, **TOL[dtype])
    torch.testing.assert_close(static, x, **TOL[dtype])  # round trip through forward
    assert not torch.allclose(u, x, atol=1e-3)  # the transporter is not the identity: the check has teeth


@pytest.mark.parametrize("time_kind", ["random", "shared", "endpoints"])
@pytest.mark.parametrize("time_features", [2, 8, 32])
def test_static_time_inputs(time_kind: str, time_features: int) -> None:
    f = make(dtype=torch.float64, time_features=time_features, kv_heads=2)
    x = torch.randn(4, *f.event_shape, dtype=torch.float64)
    t = times(time_kind, (4,), torch.float64)
    with torch.no_grad():
        u, _ = f(x, t)
        static = f.inverse(u, t, method="static")
        eager = f.inverse(u, t, method="kv-cache")
    torch.testing.assert_close(static, eager, **TOL[torch.float64])
    torch.testing.assert_close(static, x, **TOL[torch.float64])


def test_static_time_changes_the_answer() -> None:
    """The time embedding reaches the static decode (a different t gives a different x)."""
    f = make()
    u = torch.randn(2, *f.event_shape)
    with torch.no_grad():
        a = f.inverse(u, torch.tensor([0.2, 0.2]), method="static")
        b = f.inverse(u, torch.tensor([0.8, 0.8]), method="static")
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    ("image_shape", "patch_size"),
    [((1, 4, 4), 1), ((3, 4, 8), 2), ((1, 2, 2), 2)],  # 16 tokens, 8 tokens, a single token
)
def test_static_shapes_and_batch_dims(image_shape: tuple[int, int, int], patch_size: int) -> None:
    f = make(image_shape, patch_size, dtype=torch.float64)
    x = torch.randn(2, 3, *image_shape, dtype=torch.float64)  # batch shape (2, 3)
    t = torch.rand(2, 3, dtype=torch.float64)
    with torch.no_grad():
        u, _ = f(x, t)
        static = f.inverse(u, t, method="static")
    assert static.shape == x.shape
    torch.testing.assert_close(static, f.inverse(u, t), **TOL[torch.float64])
    torch.testing.assert_close(static, x, **TOL[torch.float64])


def test_static_under_bf16_autocast_matches_eager() -> None:
    """Under CPU bf16 autocast both paths give float32 tokens; they agree to bf16 rounding."""
    f = make(kv_heads=2)
    x = torch.randn(3, *f.event_shape)
    t = torch.rand(3)
    with torch.no_grad():
        u, _ = f(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            static = f.inverse(u, t, method="static")
            eager = f.inverse(u, t)
    assert static.dtype == torch.float32
    torch.testing.assert_close(static, eager, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(static, x, atol=1e-1, rtol=1e-1)


def test_inverse_method_attribute_and_errors() -> None:
    f = make()
    x = torch.randn(2, *f.event_shape)
    t = torch.rand(2)
    with torch.no_grad():
        u, _ = f(x, t)
        ref = f.inverse(u, t, method="static")
        f.inverse_method = "static"
        torch.testing.assert_close(f.inverse(u, t), ref, atol=0, rtol=0)  # the default now is "static"
        torch.testing.assert_close(f.transform(t).inv(u), ref, atol=0, rtol=0)  # so is the torch Transform's
    with pytest.raises(ValueError, match="method: expected one of"):
        f.inverse(u, t, method="static-cache")
    f.inverse_method = "bogus"
    with pytest.raises(ValueError, match="method: expected one of"):
        f.inverse(u, t)
    f.inverse_method = "kv-cache"
    # A CUDA graph on the CPU: a clear error naming the way out.
    with pytest.raises(ValueError, match="CUDA tensor.*method='static'"):
        f.inverse(u, t, method="graph")
    with pytest.raises(ValueError, match="CUDA tensor"):
        StaticCacheInverse(f)(u, t)
    with pytest.raises(ValueError, match="warmup"):
        StaticCacheInverse(f, warmup=0)
    # Shapes are checked as for the other methods.
    with pytest.raises(ValueError, match="u"):
        f.inverse(u[..., :2], t, method="static")


def test_static_without_gradient() -> None:
    """No gradient flows through the static path: asking for one is an error, parameters get none."""
    f = make()
    u = torch.randn(2, *f.event_shape, requires_grad=True)
    t = torch.rand(2)
    with pytest.raises(ValueError, match="no gradient.*kv-cache"):
        f.inverse(u, t, method="static")
    x = f.inverse(u.detach(), t, method="static")  # grad mode on, parameters require grad: runs, no graph
    assert x.grad_fn is None and not x.requires_grad
    # The kv-cache path stays differentiable.
    f.inverse(u, t).sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


# --------------------------------------------------------------------------------------- the layer level


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_static_kv_cache_matches_causal_pass(kv_heads: int | None) -> None:
    torch.manual_seed(0)
    net = Transformer(16, depth=2, heads=2, kv_heads=kv_heads).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    cos, sin = RotaryEmbedding2D(8)(patch_grid(1, 5, 1))
    with torch.no_grad():
        full = net(x, (cos, sin), causal=True)
        position = torch.zeros(1, dtype=torch.long)
        caches = net.make_static_caches(5, position)
        steps = []
        for _ in range(5):
            rope = (cos.index_select(0, position), sin.index_select(0, position))
            steps.append(net(x.index_select(1, position), rope, causal=True, caches=caches))
            position.add_(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL[torch.float64])


def test_static_kv_cache_mask_and_errors() -> None:
    position = torch.zeros(1, dtype=torch.long)
    cache = StaticKVCache(3, position)
    k = torch.randn(1, 2, 1, 4)
    _, _, mask = cache.write(k, k)
    assert mask.tolist() == [[True, False, False]]
    position.add_(2)
    kk, _, mask = cache.write(2 * k, 2 * k)
    assert mask.tolist() == [[True, True, True]]
    torch.testing.assert_close(kk[:, :, 2:], 2 * k)
    assert bool((kk[:, :, 1] == 0).all())  # the slot never written stays zero (and is masked out)
    with pytest.raises(ValueError, match="one token at a time"):
        cache.write(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="position"):
        StaticKVCache(3, torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(0, position)
    attn = tfm.Attention(8, heads=2)
    with pytest.raises(ValueError, match="key_mask"):
        attn(
            torch.randn(1, 1, 8),
            cache=StaticKVCache(2, torch.zeros(1, dtype=torch.long)),
            key_mask=torch.ones(1, 2, dtype=torch.bool),
        )


def test_grouped_attention_fallback_matches_enable_gqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Old torch (no ``enable_gqa``): K/V are repeated instead; the answer is the same."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 5, 8, dtype=torch.float64), torch.randn(2, 2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False]])
    a = grouped_attention(q, k, v, mask)
    monkeypatch.setattr(tfm, "SDPA_HAS_GQA", False)
    b = grouped_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(a, ref, **TOL[torch.float64])
    torch.testing.assert_close(b, ref, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_graph_replay_matches_static_on_cuda(autocast: bool) -> None:
    f = make(kv_heads=2).cuda()
    helper = StaticCacheInverse(f)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for n in (3, 5, 3):  # two batch sizes, the first one replayed
            x = torch.randn(n, *f.event_shape, device="cuda")
            t = torch.rand(n, device="cuda")
            u, _ = f(x, t)
            graphed = helper(u, t)
            static = f.inverse(u, t, method="static")
            torch.testing.assert_close(graphed, static, atol=1e-5 if not autocast else 3e-2, rtol=1e-5)
    assert helper.num_graphs == 2
