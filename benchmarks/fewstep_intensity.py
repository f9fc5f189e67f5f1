"""Pixel intensities of the few-step samples: are the NTM's bolder strokes sharper digits or clipped noise?

Reads the 64-sample grids that ``benchmarks/fewstep.py`` saved for seed 0 (8-bit PNGs, ``<work>/grids``) and
64 real test images pooled the same way, and counts, per grid:

* ``foreground_share``: the share of pixels above 25 (of 255), i.e. not background;
* ``foreground_mean``: their mean intensity;
* ``saturated_share``: the share of foreground pixels at 250 or more, i.e. at the top of the range, where the
  samplers' outputs are clipped (the metrics clip samples to [-1, 1] too).

Real MNIST has 9% of its foreground at the top of the range and real Fashion-MNIST none; a sampler whose
share is far above that draws values past the data's range that the clip turns into flat white.

Usage::

    python benchmarks/fewstep_intensity.py            # both data sets' work folders under runs/
    python benchmarks/fewstep_intensity.py --work mnist=/path/to/fewstep-cpu fashion-mnist=/path/to/fashion
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, source_state, write_results  # noqa: E402

from trajflow.data.images import load_fashion_mnist, load_mnist  # noqa: E402

LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
SIDE = 14  # the CPU configs' resolution; a grid tile is SIDE pixels with a 1-pixel border, upscaled 2x


def stats(images: np.ndarray) -> dict[str, float]:
    """The three intensity figures of 8-bit images ``(N, H, W)``."""
    x = images.astype(np.float64)
    fg = x[x > 25]
    return {
        "foreground_share": float(fg.size / x.size),
        "foreground_mean": float(fg.mean()),
        "saturated_share": float(np.mean(fg >= 250)),
    }


def grid_tiles(path: Path) -> np.ndarray:
    """The 64 images ``(64, SIDE, SIDE)`` of a ``save_grid`` PNG (8 x 8 tiles, 1-pixel borders, 2x upscaled)."""
    im = np.asarray(Image.open(path))[::2, ::2]
    step = SIDE + 1
    return np.stack(
        [im[1 + r * step : 1 + r * step + SIDE, 1 + c * step : 1 + c * step + SIDE] for r in range(8) for c in range(8)]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", nargs="*", default=[], help="dataset=folder pairs (default: runs/fewstep-cpu[-fashion])")
    ap.add_argument("--out", type=Path, default=RESULTS / "fewstep_intensity.json")
    args = ap.parse_args(argv)
    source = source_state()
    works = {"mnist": ROOT / "runs" / "fewstep-cpu", "fashion-mnist": ROOT / "runs" / "fewstep-cpu-fashion"}
    works.update(dict(item.split("=", 1) for item in args.work))
    rows = []
    for dataset, work in works.items():
        real = F.avg_pool2d(LOADERS[dataset]("test").images[:64].float(), 28 // SIDE).round().numpy()[:, 0]
        samples = {"real": real}
        for png in sorted((Path(work) / "grids").glob("*.png")):
            if png.stem.startswith("teacher") or png.stem.endswith("-s0") or png.stem.endswith("-s0-learned-denoiser"):
                samples[png.stem] = grid_tiles(png)
        for name, images in samples.items():
            figures = stats(images)
            for metric, value in figures.items():
                rows.append(
                    {
                        "task": dataset,
                        "method": name,
                        "steps": None,
                        "metric": metric,
                        "value": value,
                        "seed": 0,
                        "images": len(images),
                    }
                )
            print(dataset, name.ljust(60), {k: round(v, 3) for k, v in figures.items()})
    write_results(args.out, "fewstep_intensity", rows, command=command_line(), source=source, device="cpu")
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
