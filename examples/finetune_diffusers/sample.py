"""Sample a fine-tuned NTM (train.py's output) to PNGs, and the flow-matching model it started from beside it.

    python examples/finetune_diffusers/sample.py --run runs/flux2_klein_512 --prompt "a photo of a red fox" \\
        --n 4 --seed 0 --steps 4 --guidance 1.0 --device cuda --dtype bf16
    python examples/finetune_diffusers/sample.py --run runs/flux2_klein_512 --prompts prompts.txt \\
        --fm-steps 50 --fm-guidance-scale 4.0      # also "FM at 50 steps", as diffusers runs it, same noise

``--run`` is train.py's ``--out`` (its ``sample.json`` names the local pipeline folder, the NTM folder and the
settings); ``--pretrained`` / ``--model`` override them. The NTM takes ``--steps`` steps with the clipped Gaussian
guidance weight ``--guidance`` (``w``); the FM baseline (``--fm-steps`` > 0) is the pipeline's own transformer
sampled by diffusers' ``FlowMatchEulerDiscreteScheduler`` with diffusers' ``--fm-guidance-scale`` (``1 + w``),
from the same initial noise for the same ``--seed``. Images are decoded by the pipeline's VAE in float32. One PNG
per image: ``<out>/<method>-<k>steps-seed<seed>-<prompt index>-<image index>.png`` and the prompts in
``prompts.txt``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="train.py's output folder (holds sample.json)")
    p.add_argument("--pretrained", default=None, help="the local diffusers pipeline folder (default: sample.json's)")
    p.add_argument("--model", default=None, help="the NTM folder (default: sample.json's, <run>/model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="NTM steps (default: sample.steps)")
    p.add_argument("--guidance", type=float, default=None, help="NTM guidance weight w (default: sample.guidance)")
    p.add_argument("--t-min", type=float, default=None, help="the NTM's cleanest level (default: sample.t_min)")
    p.add_argument("--fm-steps", type=int, default=0, help="also sample the pipeline's FM model in this many steps")
    p.add_argument("--fm-guidance-scale", type=float, default=None, help="diffusers' guidance scale of the FM model")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="backbone and text encoder dtype")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: give at least one --prompt or a --prompts file", file=sys.stderr)
        return 2
    settings = json.loads((Path(args.run) / "sample.json").read_text()) if args.run else {}
    pretrained = args.pretrained or settings.get("pretrained")
    model = args.model or settings.get("model")
    if not pretrained or not model:
        print("error: give --run (train.py's --out) or both --pretrained and --model", file=sys.stderr)
        return 2
    sample = settings.get("sample", {})
    steps = args.steps or sample.get("steps", 4)
    guidance = args.guidance if args.guidance is not None else sample.get("guidance", 0.0)
    t_min = args.t_min if args.t_min is not None else sample.get("t_min")
    dtype = DTYPES[args.dtype or settings.get("dtype", "fp32")]
    out = Path(args.out) if args.out else Path(args.run or ".") / "samples"
    out.mkdir(parents=True, exist_ok=True)

    from trajflow.contrib.diffusers import NTMDiffusersPipeline

    pipe = NTMDiffusersPipeline.from_local(
        pretrained,
        model,  # its diffusers backbone in --dtype, the NTM's own parts and the VAE in float32
        teacher=args.fm_steps > 0,
        resolution=settings.get("resolution"),
        torch_dtype=dtype,
        device=args.device,
        max_sequence_length=settings.get("max_sequence_length"),
        negative_prompt=settings.get("negative_prompt", ""),
    )

    def generator() -> torch.Generator:
        return torch.Generator(device=args.device).manual_seed(args.seed)

    runs = [(f"ntm-{steps}steps-w{guidance:g}", lambda: pipe(prompts, steps=steps, guidance=guidance, t_min=t_min,
                                                            generator=generator(), num_images_per_prompt=args.n,
                                                            output_type="pil"))]  # fmt: skip
    if args.fm_steps > 0:
        scale = args.fm_guidance_scale if args.fm_guidance_scale is not None else sample.get("fm_guidance_scale", 1.0)
        runs.append((f"fm-{args.fm_steps}steps-g{scale:g}", lambda: pipe.flow_matching(
            prompts, steps=args.fm_steps, guidance_scale=scale, generator=generator(), num_images_per_prompt=args.n,
            output_type="pil")))  # fmt: skip
    for tag, run in runs:
        for k, image in enumerate(run()):
            path = out / f"{tag}-seed{args.seed}-{k // args.n:03d}-{k % args.n:02d}.png"
            image.save(path)
            print(path)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
