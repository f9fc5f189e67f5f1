"""Fine-tune an NTM from a local diffusers checkpoint (SD3, FLUX.1, FLUX.2) with accelerate.

One process (CPU or one GPU)::

    python examples/finetune_diffusers/train.py --config examples/finetune_diffusers/configs/flux2_klein_512.json \\
        --set pretrained='"/models/FLUX.2-klein-base-4B"' --set data.root='"/data/captioned"'

Several GPUs (FSDP shards the backbone, its gradients and AdamW states; see accelerate/*.yaml)::

    accelerate launch --config_file examples/finetune_diffusers/accelerate/fsdp_flux2.yaml \\
        examples/finetune_diffusers/train.py --config examples/finetune_diffusers/configs/flux2_klein_512.json

The end-to-end check on the CPU, with tiny random models it writes to a temporary folder (seconds)::

    python examples/finetune_diffusers/train.py --smoke

The recipe (NTM §3.3, the one of ``benchmarks/fewstep.py``): the pipeline's transformer through its trajflow
adapter (``trajflow.contrib.diffusers``) is the predictor's backbone; the transporter is a TarFlow-style
transformer that is exactly the identity at initialisation; the predictor's mean is the model's own Gaussian
posterior mean (no delta mean) and its scale the posterior's times a zero-initialised delta-sigma head, so the
NTM starts as the flow-matching model's posterior sampler; the loss is the trajectory NLL plus the mean alignment
against a frozen copy of the backbone, decayed to 0 over the run (``FinetuneLoss(decay_fraction=1.0)``).
Images come from a local folder of images with ``.txt`` captions beside them (``trajflow.data.CaptionFolder``),
encoded on the fly by the pipeline's own VAE and text encoders (frozen, float32 VAE, autocast off).

Writes ``--out``: the Trainer's ``config.json``, ``log.jsonl`` and ``checkpoints/`` (resumable exactly with
``--resume``), then ``model/`` (the NTM with the EMA weights, ``NTM.save_pretrained``) and ``sample.json`` (what
``sample.py`` needs: the pipeline folder and the sampling settings). Nothing is downloaded: every model is read
from a local folder (``local_files_only=True``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: the repository root holds the ``examples`` package (its data sets)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# -- configuration --------------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
SMOKE_CONFIG = HERE / "configs" / "smoke.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a JSON config (configs/*.json)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="continue from the newest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (JSON value)")
    p.add_argument("--smoke", action="store_true", help="CPU run on tiny random models written to a temp folder")
    return p.parse_args(argv)


def read_config(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The JSON config with ``section.field=value`` overrides (values parsed as JSON, else taken as strings)."""
    config = json.loads(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = parsed
    return config


# -- the objective: images and captions in, the fine-tuning loss out -----------------------------------------


class LatentTextObjective:
    """A Trainer objective: a batch of ``{"image", "caption"}`` -> VAE latents and text condition -> ``loss``.

    The VAE (float32) and the text encoders are frozen and run without autocast, outside the model, so that DDP
    and FSDP never see them; ``loss`` is a :class:`~trajflow.finetune.FinetuneLoss`.
    """

    loss_name = "finetune_loss"

    def __init__(self, loss: Any, vae: Any, encode_prompt: Any) -> None:
        self.loss, self.vae, self.encode_prompt = loss, vae, encode_prompt

    def __call__(self, model, batch, generator, step, *, progress=None):
        with torch.no_grad():
            x0 = self.vae.encode(batch["image"])
            cond = self.encode_prompt(list(batch["caption"]))
        return self.loss(model, (x0, cond), generator, step, progress=progress)


# -- the smoke path: a tiny random SD3 pipeline and a tiny caption folder ------------------------------------


def make_tiny_pipeline(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``StableDiffusion3Pipeline`` (2-layer SD3 transformer, 2-block VAE, two CLIP text
    encoders and a T5, word-level tokenizers) to ``folder`` with its ``save_pretrained``; 16 px images, 8x8x4
    latents, 8 CLIP + 8 T5 tokens of width 16. Nothing is downloaded."""
    import diffusers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
    )

    words = "a an the photo of red green blue small large cat dog circle square on left right".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}

    def tokenizer() -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
            model_max_length=8,
        )  # fmt: skip

    def clip() -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=8, projection_dim=8, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        )  # fmt: skip
        return CLIPTextModelWithProjection(config)

    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
        )
    )
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1,
    )  # fmt: skip
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        text_encoder=clip().eval(),
        tokenizer=tokenizer(),
        text_encoder_2=clip().eval(),
        tokenizer_2=tokenizer(),
        text_encoder_3=t5.eval(),
        tokenizer_3=tokenizer(),
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def make_tiny_captions(folder: str | Path, n: int = 8, size: int = 16, *, seed: int = 0) -> Path:
    """Write ``n`` random ``size`` px PNGs with a ``.txt`` caption beside each to ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    colours, shapes = ["red", "green", "blue"], ["circle", "square"]
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {colours[i % 3]} {shapes[i % 2]} on the left")
    return folder


# -- the run --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not args.config:
        print("error: give --config FILE (or --smoke)", file=sys.stderr)
        return 2
    config = read_config(args.config or SMOKE_CONFIG, list(args.set))
    if args.smoke:  # tiny random models and images in a temporary folder, unless the config names them
        scratch = Path(tempfile.mkdtemp(prefix="ntm-diffusers-smoke-"))
        if not config.get("pretrained"):
            config["pretrained"] = str(make_tiny_pipeline(scratch / "pipeline"))
        if not config["data"].get("root"):
            config["data"]["root"] = str(make_tiny_captions(scratch / "images", size=config["data"]["resolution"]))
    for key in ("pretrained", "data.root"):
        section, _, field = key.rpartition(".")
        if not (config[section] if section else config).get(field):
            print(
                f"error: the config needs {key} (a local folder); set it with --set {key}='\"PATH\"'", file=sys.stderr
            )
            return 2
    out = Path(args.out) if args.out else Path("runs") / config["name"]

    # The imports that need the extras come here, so that --help works without them.
    from examples.t2i.data import CaptionFolder
    from trajflow import TrajectoryNLL
    from trajflow.checkpoint import dataclass_from_dict
    from trajflow.contrib.diffusers import (
        PIPELINE_ADAPTERS,
        DiffusersPromptEncoder,
        PipelineVAE,
        load_diffusers_pipeline,
    )
    from trajflow.finetune import FinetuneLoss, MeanAlignmentLoss, init_from_flow_matching
    from trajflow.train import Trainer, TrainerConfig

    # 1. The Trainer first: it sets up accelerate (device, processes) and the seeds.
    train = dataclass_from_dict(TrainerConfig, config["train"], "config.train")  # old keys named with new ones
    trainer = Trainer(train, out)
    trainer.check_out_dir(args.resume)
    device = trainer.device

    # 2. The frozen parts of the diffusers pipeline: its text encoders, tokenizers and VAE (float32).
    text = config["text"]
    pipe = load_diffusers_pipeline(config["pretrained"], torch_dtype=DTYPES[text["dtype"]], device=device)
    name = type(pipe).__name__
    if name not in PIPELINE_ADAPTERS:
        print(f"error: {config['pretrained']} holds a {name}; supported: {sorted(PIPELINE_ADAPTERS)}", file=sys.stderr)
        return 2
    encode = DiffusersPromptEncoder(pipe, max_sequence_length=text["max_sequence_length"], device=device)
    vae = PipelineVAE(pipe.vae).to(device)
    resolution = int(config["data"]["resolution"])
    latent_shape = vae.latent_shape(resolution)

    # 3. The velocity adapter around the pipeline's transformer; the empty prompt is its null condition.
    null = encode([text["negative_prompt"]])  # (prompt_embeds, pooled) or prompt_embeds (FLUX.2), a batch of 1
    null = tuple(c.float().cpu() for c in null) if isinstance(null, tuple) else null.float().cpu()
    velocity = PIPELINE_ADAPTERS[name].from_diffusers(
        config["pretrained"], subfolder="transformer", sample_size=list(latent_shape[1:]), null_cond=null,
        validate_args=False,
    )  # fmt: skip
    backbone = velocity.model
    if config["model"]["gradient_checkpointing"] and getattr(backbone, "_supports_gradient_checkpointing", False):
        backbone.enable_gradient_checkpointing()

    # 4. The NTM: identity transporter, the model's posterior mean, a zero-initialised delta-sigma head.
    m = config["model"]
    model, reference = init_from_flow_matching(
        velocity, transporter_kwargs=m["transporter"], delta_mean=False, c_min=m["c_min"], validate_args=False
    )
    reference_dtype = torch.bfloat16 if train.mixed_precision == "bf16" else torch.float32
    reference = reference.to(device=device, dtype=reference_dtype)  # frozen: half the memory in bf16
    parameters = sum(p.numel() for p in model.parameters())
    trainer.print(
        f"ntm from {name} ({config['pretrained']}): {parameters / 1e6:.2f}M parameters, latents {tuple(latent_shape)}, "
        f"{trainer.world_size} process(es) on {device} ({train.mixed_precision})"
    )

    # 5. Data and loss: trajectory NLL + mean alignment decayed over the whole run (steps or time budget).
    data = CaptionFolder(config["data"]["root"], transform=resolution)
    loss = config["loss"]
    nll = TrajectoryNLL(
        steps=loss["steps"], t_min=tuple(loss["t_min"]), shift=loss["shift"], mode=loss["mode"],
        cond_drop=loss["cond_drop"], validate_args=False,
    )  # fmt: skip
    objective = LatentTextObjective(
        FinetuneLoss(nll, MeanAlignmentLoss(reference), aux_weight=loss["aux_weight"], decay_fraction=1.0), vae, encode
    )
    model_config = model.config_dict()  # before wrapping: rebuilds the NTM for the export under FSDP
    result = trainer.fit(model, objective, data, run_config=config, resume=args.resume)

    # 6. Export the EMA weights as a pretrained folder (NTM.save_pretrained), and what sample.py needs.
    trainer.accelerator.wait_for_everyone()
    if trainer.is_main:
        if str(trainer.accelerator.distributed_type).endswith("FSDP"):  # sharded: rebuild from the checkpoint
            from trajflow import NTM
            from trajflow.checkpoint import load_model_weights

            export = NTM.from_config(model_config)
            load_model_weights(result.checkpoint, export, ema=result.ema is not None)
        else:  # one process or DDP: the model is whole here; the run is over, so the EMA goes into it
            export = model
            if result.ema is not None:
                result.ema.copy_to(export)
        folder = export.save_pretrained(out / "model")
        sample = {"pretrained": str(config["pretrained"]), "model": str(folder), "resolution": resolution, **text}
        (out / "sample.json").write_text(json.dumps({**sample, "sample": config["sample"]}, indent=2) + "\n")
        trainer.print(
            f"done: step {result.step}, loss {result.loss:.4f}, {result.images_per_s:.2f} images/s; model {folder}\n"
            f'sample: python {Path(__file__).parent / "sample.py"} --run {out} --prompt "..."'
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
