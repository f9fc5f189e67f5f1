"""Benchmark: KV-cached vs static-cache vs naive inverse of the transformer transporter.

The inverse of a causal affine flow block decodes token by token. With a KV cache each step runs one
token through the layers (``L - 1`` one-token passes per block); the naive reference recomputes the full
causal pass at every token (``L - 1`` full passes). The static cache (``method="static"``) preallocates
the cache and writes it at a position held in a device tensor, so every step has the same shapes (on a
GPU the whole decode is then captured in one CUDA graph: ``method="graph"``, timed with ``--device cuda``,
and the GPU numbers belong to ``benchmarks/gpu.py``). All must give the same ``x``.

Writes ``benchmarks/results/kv_cache.json`` (medians over repeats, the speedup, the max abs difference).

Usage::

    python benchmarks/kv_cache.py                 # CPU, small config
    python benchmarks/kv_cache.py --device cuda   # GPU (times are synchronised)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common when run as a script

from _common import write_results  # noqa: E402

from trajflow.transporters.transformer import TransformerTransporter, TransformerTransporterConfig

RESULTS = Path(__file__).resolve().parent / "results" / "kv_cache.json"


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Wall-clock seconds of ``repeats`` calls (after one warm-up call), and the last output."""
    out = fn()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", type=int, nargs=3, default=[4, 16, 16], metavar=("C", "H", "W"))
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="layers per block")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared machine, spinning OpenMP threads distort small ops)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = TransformerTransporterConfig(
        tuple(args.image),
        args.patch,
        width=args.width,
        heads=args.heads,
        layers_per_block=args.layers,
        blocks=args.blocks,
        validate_args=False,
    )
    f = TransformerTransporter(cfg).to(device).eval()
    # A non-identity transporter: small random heads instead of the zero init.
    for block in f.blocks:
        torch.nn.init.normal_(block.head.weight, std=0.02)
    x = torch.randn(args.batch, *cfg.image_shape, device=device)
    t = torch.rand(args.batch, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with torch.no_grad(), autocast:
        u, _ = f(x, t)
        kv_times, x_kv = timed(lambda: f.inverse(u, t), device, args.repeats)
        naive_times, x_naive = timed(lambda: f.inverse_naive(u, t), device, args.repeats)
        static_method = "graph" if device.type == "cuda" else "static"
        static_times, x_static = timed(lambda: f.inverse(u, t, method=static_method), device, args.repeats)
    kv, naive, static = (statistics.median(v) for v in (kv_times, naive_times, static_times))
    diff = float((x_kv - x_naive).abs().max())
    static_diff = float((x_static - x_kv).abs().max())
    err = float((x_kv - x).abs().max())

    task = (
        f"transporter inverse {'x'.join(map(str, args.image))} p{args.patch} "
        f"({cfg.num_tokens} tokens) w{args.width} {args.blocks}x{args.layers} batch {args.batch}"
        + (" bf16" if args.bf16 else " fp32")
    )
    common = {
        "task": task,
        "steps": None,
        "seed": 0,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    rows = [
        {**common, "method": "kv-cache", "metric": "inverse_seconds", "value": kv, "all": kv_times},
        {**common, "method": "naive", "metric": "inverse_seconds", "value": naive, "all": naive_times},
        {**common, "method": "kv-cache", "metric": "speedup", "value": naive / kv, "baseline": "naive"},
        {**common, "method": "kv-cache", "metric": "max_abs_diff_vs_naive", "value": diff},
        {**common, "method": "kv-cache", "metric": "max_abs_roundtrip_error", "value": err},
        {
            **common,
            "method": f"static-{static_method}",
            "metric": "inverse_seconds",
            "value": static,
            "all": static_times,
        },
        {
            **common,
            "method": f"static-{static_method}",
            "metric": "speedup",
            "value": kv / static,
            "baseline": "kv-cache",
        },
        {**common, "method": f"static-{static_method}", "metric": "max_abs_diff_vs_kv_cache", "value": static_diff},
    ]
    result = write_results(args.out, "kv_cache", rows, device=device, extra={"torch": torch.__version__})
    print(f"{task}: kv-cache {kv:.3f}s, naive {naive:.3f}s, speedup {naive / kv:.1f}x, max|diff| {diff:.2e}")
    print(f"  static ({static_method}) {static:.3f}s, {kv / static:.2f}x the kv-cache, max|diff| {static_diff:.2e}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
