"""Evaluate trained text-to-image models: compositional score (shapes) and Fréchet distances, no downloads.

    python examples/t2i/evaluate.py --checkpoint runs/shapes_cpu_smoke --checkpoint runs/shapes_cpu_smoke_fm \\
        --steps 4 --steps 50 --n-prompts 256

For the shapes data: a GenEval-style compositional score (objects, colours, counts, positions read back by a
small classifier trained once on the generator's ground truth and cached under ``--out/evaluators``, with
checkpoints as it trains, so that an interrupted evaluation continues that training where it stopped; its
accuracy on held-out real images is printed first, so the score can be read against that ceiling) and the
Fréchet distance between that classifier's features of generated and real images of the same prompts. For
other data: the Fréchet distance on a contrastive image-text network trained once on the dataset, and an
image-caption alignment score. Standard FID and CLIP score (torchmetrics) run only with local weights:
``--fid-weights FILE`` (Inception for FID) and ``--clip-model FOLDER`` (a saved CLIP model).

Results go to ``--out/eval.json`` (rows in the benchmark format) with a sample grid per model and step count.

``--path raw|full|fast`` picks the NTM sampling path for every NTM checkpoint (``fast`` needs ``--denoiser DIR``,
one per NTM checkpoint in the same order); ``--t-min`` the cleanest time (default 0.02 for ``full``/``fast``).
Flow-matching checkpoints always sample with their Euler steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from trajflow.checkpoint import save_json
from trajflow.denoise import load_denoiser

if __package__ in (None, ""):  # run as a script: the repository root holds the ``examples`` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.t2i.data import build_dataset  # noqa: E402
from examples.t2i.evaluation import (  # noqa: E402
    dataset_pairs,
    evaluate_shapes_model,
    evaluate_text_image_model,
    load_or_train_shapes_reader,
    load_or_train_text_image_features,
    shapes_prompts,
    torchmetrics_clip_score,
    torchmetrics_fid,
)
from examples.t2i.model import load_t2i  # noqa: E402
from examples.t2i.sampling import save_image_grid  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, help="run or step folder (repeatable)")
    p.add_argument("--steps", type=int, action="append", default=None, help="sampling steps (repeatable)")
    p.add_argument("--guidance", type=float, default=None, help="guidance weight (default: the config's)")
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default=None, help="output folder (default: <first run>/eval)")
    p.add_argument("--fid-weights", default=None, help="local Inception weights for torchmetrics FID")
    p.add_argument("--clip-model", default=None, help="local CLIP folder for torchmetrics CLIP score")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--path", choices=("raw", "full", "fast"), default="raw", help="NTM sampling path")
    p.add_argument("--t-min", type=float, default=None, help="cleanest time (default: 0.02 for full/fast)")
    p.add_argument("--denoiser", action="append", default=[], help="denoiser folder per NTM checkpoint (fast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundles = [load_t2i(c, ema=not args.no_ema, device=args.device) for c in args.checkpoint]
    ntms = [i for i, b in enumerate(bundles) if b.kind != "fm"]
    if args.path == "fast" and len(args.denoiser) != len(ntms):
        print(f"error: --path fast needs one --denoiser per NTM checkpoint ({len(ntms)})", file=sys.stderr)
        return 2
    if args.path != "raw":
        denoisers = iter(args.denoiser)
        for i in ntms:
            den = load_denoiser(next(denoisers)).to(args.device) if args.path == "fast" else None
            bundles[i] = dataclasses.replace(bundles[i], path=args.path, t_min=args.t_min, denoiser=den)
    elif args.t_min is not None:
        bundles = [dataclasses.replace(b, t_min=args.t_min) for b in bundles]
    first = bundles[0]
    run = first.checkpoint.parent.parent if first.checkpoint.parent.name == "checkpoints" else first.checkpoint
    out = Path(args.out) if args.out else run / "eval"
    data = first.config.to_dict()["data"]
    if any(b.config.to_dict()["data"] != data for b in bundles):
        print("error: the checkpoints were trained on different data; evaluate them separately", file=sys.stderr)
        return 2
    rows, report = [], {}
    if data["name"] == "shapes":
        reader, reader_report = load_or_train_shapes_reader(out / "evaluators", data, device=args.device, progress=True)
        real_scores = reader_report["heldout_real_scores"]
        print(
            f"reader: held-out real images: cell accuracy {reader_report['heldout_cell_accuracy']:.3f}, "
            f"compositional score {real_scores['compositional_score']:.3f} (the ceiling)"
        )
        report["reader"] = reader_report
    else:
        dataset = build_dataset(first.config.data)
        key = {"data": data, "text": first.config.to_dict()["text"]}
        net, net_report = load_or_train_text_image_features(
            out / "evaluators",
            key,
            lambda: dataset_pairs(dataset, first.encoder)[:2],
            device=args.device,
            progress=True,
        )
        print(f"features: held-out retrieval top-1 {net_report.get('heldout_retrieval_top1', float('nan')):.3f}")
        report["features"] = net_report
        real, _, captions = dataset_pairs(dataset, first.encoder, args.n_prompts, seed=args.seed + 1)
    for bundle in bundles:
        for steps in args.steps or [bundle.config.sample.steps]:
            name = f"{bundle.config.name}-{bundle.kind}-{steps}steps"
            if bundle.kind != "fm" and bundle.path != "raw":
                name += f"-{bundle.path}"
            if data["name"] == "shapes":
                metrics, images, captions = evaluate_shapes_model(
                    bundle,
                    reader,
                    n_prompts=args.n_prompts,
                    steps=steps,
                    guidance=args.guidance,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    progress=True,
                )
                headline = ["compositional_score", "frechet_distance", "sample_images_per_s"]
            else:
                metrics, images = evaluate_text_image_model(
                    bundle,
                    net,
                    real,
                    captions,
                    steps=steps,
                    guidance=args.guidance,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    progress=True,
                )
                headline = ["frechet_distance", "alignment", "sample_images_per_s"]
            if args.fid_weights:
                metrics["fid_torchmetrics"] = torchmetrics_fid(
                    real if data["name"] != "shapes" else _shapes_real(bundle, args.n_prompts),
                    images,
                    args.fid_weights,
                    device=args.device,
                )
                headline.append("fid_torchmetrics")
            if args.clip_model:
                metrics["clip_score_torchmetrics"] = torchmetrics_clip_score(
                    images, captions, args.clip_model, device=args.device
                )
                headline.append("clip_score_torchmetrics")
            report[name] = metrics
            method = (
                "fm-euler" if bundle.kind == "fm" else bundle.kind + ("" if bundle.path == "raw" else f"-{bundle.path}")
            )
            for metric in headline:
                rows.append(
                    {
                        "task": f"{data['name']}-{data['resolution']}px",
                        "method": method,
                        "steps": steps,
                        "metric": metric,
                        "value": metrics[metric],
                        "seed": args.seed,
                        "checkpoint": str(bundle.checkpoint),
                    }
                )
            print(name + ": " + ", ".join(f"{m} {metrics[m]:.4g}" for m in headline))
            save_image_grid(images[:64], out / f"{name}.png", nrow=8)
    save_json(out / "eval.json", {"rows": rows, "details": report})
    print(f"results: {out / 'eval.json'}")
    return 0


def _shapes_real(bundle, n: int) -> torch.Tensor:
    return shapes_prompts(bundle.config.to_dict()["data"], n)[1]


if __name__ == "__main__":
    raise SystemExit(main())
