"""The diffusers sampler pipeline (``NTMDiffusersPipeline``) and the fine-tuning example, on tiny random models.

A tiny random ``StableDiffusion3Pipeline`` (2-layer SD3 transformer, 2-block VAE, two CLIP text encoders and a
T5 with word-level tokenizers; ``examples/finetune_diffusers/train.py``'s smoke builder) is written to a
temporary folder and read back from it only (``local_files_only=True``). Checked: the NTM pipeline's images
(shape, dtype, range, determinism under a generator, the same initial noise as the FM baseline), a bfloat16
backbone with the float32 VAE, the FM baseline against diffusers' own ``StableDiffusion3Pipeline.__call__`` and
against ``euler_sample`` through the adapter, the float32 FLUX.2 VAE layout against the FLUX.2 pipeline's
helpers, ``train.py --smoke`` end to end, and the errors at the edge.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers", minversion="0.30", reason="the diffusers pipeline needs diffusers")
pytest.importorskip("transformers", reason="the diffusers pipeline's text encoders need transformers")

from trajflow import NTM, time_grid  # noqa: E402
from trajflow.baselines.flow_matching import euler_sample  # noqa: E402
from trajflow.checkpoint import load_model_weights  # noqa: E402
from trajflow.contrib.diffusers import (  # noqa: E402
    NTMDiffusersPipeline,
    PipelineVAE,
    SD3Velocity,
    load_diffusers_pipeline,
    scheduler_sample,
)
from trajflow.finetune import init_from_flow_matching  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_diffusers"
TINY_TRANSPORTER = {"patch_size": 2, "width": 16, "heads": 2, "layers_per_block": 1, "scale_bound": 1.0}
PROMPTS = ["a red circle on the left", "a blue dog"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"finetune_diffusers_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _script("train").make_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "sd3")


@pytest.fixture(scope="module")
def teacher(folder) -> NTMDiffusersPipeline:
    """The FM baseline alone: the pipeline's transformer through SD3Velocity, null = the empty prompt."""
    return NTMDiffusersPipeline.from_local(folder, max_sequence_length=8)


@pytest.fixture(scope="module")
def pipe(teacher) -> NTMDiffusersPipeline:
    """An NTM initialised from the teacher (its posterior sampler), beside the teacher."""
    torch.manual_seed(0)
    model = init_from_flow_matching(teacher.velocity, transporter_kwargs=TINY_TRANSPORTER).model.eval()
    return NTMDiffusersPipeline(
        model,
        teacher.vae,
        teacher.encode_prompt,
        velocity=teacher.velocity,
        scheduler=teacher.scheduler,
        pipeline=teacher.pipeline,
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- (1) the NTM pipeline: prompts -> text encoders -> 4 NTM steps -> float32 VAE --------------------------------


def test_ntm_images_have_the_right_shape_dtype_and_are_deterministic(pipe):
    assert isinstance(pipe.velocity, SD3Velocity) and pipe.pipeline == "StableDiffusion3Pipeline"
    images = pipe(PROMPTS, steps=4, guidance=1.0, generator=_gen(0), num_images_per_prompt=2)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert bool(torch.isfinite(images).all()) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(pipe(PROMPTS, steps=4, guidance=1.0, generator=_gen(0), num_images_per_prompt=2), images)
    assert not torch.equal(pipe(PROMPTS, steps=4, guidance=1.0, generator=_gen(1), num_images_per_prompt=2), images)
    # images of one prompt are adjacent, as diffusers' num_images_per_prompt: the same condition, other noise
    cond = pipe.encode(PROMPTS, 2)
    assert torch.equal(cond[0][0], cond[0][1]) and not torch.equal(cond[0][1], cond[0][2])
    # the condition may come precomputed instead of as prompts
    latents = pipe(cond=pipe.encode(PROMPTS), steps=4, generator=_gen(0), output_type="latent")
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    pil = pipe(PROMPTS[:1], steps=4, generator=_gen(0), output_type="pil")
    assert len(pil) == 1 and pil[0].size == (16, 16)
    # the NTM's x_1 is the generator's first draw, the FM baseline's initial latents for the same seed
    top = pipe.model.sample(cond=pipe.encode(PROMPTS), steps=4, return_trajectory=True, generator=_gen(3))[:, -1]
    assert torch.equal(top, pipe.prepare_latents(2, _gen(3)))
    # the full path (score denoising at the cleanest level) runs too
    denoised = pipe(PROMPTS[:1], steps=4, generator=_gen(0), denoise=True)
    assert denoised.shape == (1, 3, 16, 16) and bool(torch.isfinite(denoised).all())


def test_bf16_backbone_with_a_float32_vae_gives_finite_float32_images(pipe):
    model = NTM.from_config(pipe.model.config_dict())
    model.load_state_dict(pipe.model.state_dict())
    model.predictor.velocity.model.to(torch.bfloat16)  # the diffusers network in bf16; its NTM parts stay float32
    half = NTMDiffusersPipeline(model.eval(), pipe.vae, pipe.encode_prompt)
    images = half(PROMPTS, steps=4, guidance=1.0, generator=_gen(0))
    assert images.dtype == torch.float32 and bool(torch.isfinite(images).all())
    assert all(p.dtype == torch.float32 for p in half.vae.parameters())
    full = pipe(PROMPTS, steps=4, guidance=1.0, generator=_gen(0))
    assert float((images - full).abs().max()) < 0.1  # bf16 rounding of a tiny random network, same noise


# -- (2) the FM baseline: diffusers' scheduler on the same velocity model --------------------------------------


@torch.no_grad()
def test_fm_baseline_is_what_the_diffusers_pipeline_gives(folder, teacher):
    noise = teacher.prepare_latents(2, _gen(5))
    ours = teacher.flow_matching(PROMPTS, steps=6, guidance_scale=3.0, latents=noise, output_type="latent")
    sd3 = load_diffusers_pipeline(folder, transformer=teacher.velocity.model)
    theirs = sd3(
        prompt=PROMPTS, num_inference_steps=6, guidance_scale=3.0, latents=noise, height=16, width=16,
        max_sequence_length=8, output_type="latent",
    ).images  # fmt: skip
    # The same loop: the scheduler's timesteps (its shift=3), [negative "", prompt] in one batch, its step.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    images = teacher.flow_matching(PROMPTS, steps=6, guidance_scale=3.0, latents=noise)
    pixels = sd3(
        prompt=PROMPTS, num_inference_steps=6, guidance_scale=3.0, latents=noise, height=16, width=16,
        max_sequence_length=8, output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(images, pixels, rtol=0, atol=1e-5)
    # the generator's first draw is the noise
    drawn = teacher.flow_matching(PROMPTS, steps=6, guidance_scale=3.0, generator=_gen(5), output_type="latent")
    assert torch.equal(drawn, ours)


@torch.no_grad()
def test_fm_baseline_through_the_scheduler_equals_euler_sample_through_the_adapter(teacher):
    velocity, n, steps = teacher.velocity, 2, 4
    cond = teacher.encode(PROMPTS)
    noise = teacher.prepare_latents(n, _gen(7))
    sigmas = time_grid(steps).flip(0)[:-1].tolist()  # 1, 3/4, 1/2, 1/4: the scheduler shifts them (shift=3)
    for w in (0.0, 2.0):
        ours = euler_sample(velocity, noise, steps, cond=cond, guidance=w, shift=3.0)
        theirs = scheduler_sample(
            velocity, noise, steps, cond=cond, guidance_scale=1 + w, scheduler=teacher.scheduler, sigmas=sigmas
        )
        # equal up to float32 rounding of the times (the scheduler's shift runs in numpy) and of the CFG sum
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert float((ours - noise).abs().max()) > 1e-2
    assert teacher.scheduler.config.shift == 3.0  # the pipeline's scheduler was copied, not changed


# -- the FLUX.2 latent layout of the float32 VAE --------------------------------------------------------------


@torch.no_grad()
def test_flux2_vae_layout_is_the_flux2_pipelines():
    if not hasattr(diffusers, "AutoencoderKLFlux2"):
        pytest.skip(f"diffusers {diffusers.__version__} has no AutoencoderKLFlux2")
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()  # fmt: skip
    vae.bn.running_mean.normal_()
    vae.bn.running_var.uniform_(0.5, 2.0)
    codec = PipelineVAE(vae.to(torch.bfloat16))
    assert codec.layout == "flux2" and codec.latent_shape(16) == (16, 4, 4)
    assert all(p.dtype == torch.float32 for p in codec.parameters())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    helpers = SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    latents = codec.encode(images)
    torch.testing.assert_close(latents, Flux2KleinPipeline._encode_vae_image(helpers, images, None))
    # decode: Flux2KleinPipeline.__call__'s batch-norm inverse and _unpatchify_latents, then vae.decode
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    z = Flux2KleinPipeline._unpatchify_latents(latents * std + vae.bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(codec.decode(latents), vae.decode(z).sample)


# -- the fine-tuning example, end to end --------------------------------------------------------------------------


def test_train_smoke_writes_a_loadable_checkpoint(folder, tmp_path):
    train = _script("train")
    out, images = tmp_path / "run", train.make_tiny_captions(tmp_path / "images")
    sets = [f"pretrained={json.dumps(str(folder))}", f"data.root={json.dumps(str(images))}"]
    assert train.main(["--smoke", "--out", str(out), "--set", sets[0], "--set", sets[1]]) == 0
    model = NTM.from_pretrained(out / "model")  # the EMA weights, as NTM.save_pretrained wrote them
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    again = NTM.from_config(model.config_dict())
    load_model_weights(checkpoint, again, ema=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and all(k in log[-1] for k in ("nll", "aux", "lambda"))
    settings = json.loads((out / "sample.json").read_text())
    assert settings["model"] == str(out / "model") and settings["pretrained"] == str(folder)
    assert _script("sample").main(["--run", str(out), "--prompt", "a red cat", "--n", "2", "--fm-steps", "2"]) == 0
    assert len(list((out / "samples").glob("ntm-*.png"))) == 2 and len(list((out / "samples").glob("fm-*.png"))) == 2
    pipe = NTMDiffusersPipeline.from_local(folder, out / "model", max_sequence_length=8)
    assert pipe.velocity is None and pipe(["a red cat"], generator=_gen(0)).shape == (1, 3, 16, 16)


# -- the edge ----------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_naming_the_argument(folder, pipe, tmp_path):
    with pytest.raises(ValueError, match=r"path: expected a local diffusers pipeline folder .* nothing is downloaded"):
        NTMDiffusersPipeline.from_local(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"path: .*model_index\.json' does not exist"):
        load_diffusers_pipeline(folder / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"path: .*model_index\.json' describes a diffusers StableDiffusionPipeline"):
        NTMDiffusersPipeline.from_local(tmp_path)
    with pytest.raises(ValueError, match=r"height: expected a positive multiple of 2"):
        pipe.vae.latent_shape(15)
    with pytest.raises(ValueError, match=r"model, velocity: expected an NTM, a flow-matching velocity model or both"):
        NTMDiffusersPipeline(None, pipe.vae)
    with pytest.raises(ValueError, match=r"prompts, cond: expected exactly one of them"):
        pipe(PROMPTS, cond=pipe.encode(PROMPTS))
    with pytest.raises(ValueError, match=r"output_type: expected 'pt', 'pil' or 'latent'"):
        pipe(PROMPTS, output_type="np")
    with pytest.raises(ValueError, match=r"velocity: this pipeline holds no flow-matching model"):
        NTMDiffusersPipeline(pipe.model, pipe.vae, pipe.encode_prompt).flow_matching(PROMPTS)
    with pytest.raises(ValueError, match=r"noise: "):
        scheduler_sample(pipe.velocity, torch.randn(2, 4, 6, 6), 2, cond=pipe.encode(PROMPTS))
    with pytest.raises(ValueError, match=r"vae: the model's latents \(4, 8, 8\) do not fit the VAE's 16"):
        NTMDiffusersPipeline(pipe.model, PipelineVAE(diffusers.AutoencoderKL(latent_channels=16, norm_num_groups=4,
                                                                             block_out_channels=(8,))))  # fmt: skip
