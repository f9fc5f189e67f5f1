r"""The text-to-image recipe: a text-conditioned NTM (or the flow-matching baseline on the same backbone),
trained on local text-image data through the :class:`~trajflow.train.Trainer`.

``examples/t2i`` and ``benchmarks/t2i.py`` are thin command lines over this package. Its modules, in the order
a run uses them:

* :mod:`~trajflow.recipes.t2i.config`: :class:`T2IConfig` and its sections (data, model, text, train,
  sample), read from JSON with ``"a.b=value"`` overrides;
* :mod:`~trajflow.recipes.t2i.text`: the frozen text encoder (MiniLM, or :class:`HashingTextEncoder` in tests);
* :mod:`~trajflow.recipes.t2i.vae`: the optional latent space of a local diffusers ``AutoencoderKL``;
* :mod:`~trajflow.recipes.t2i.build`: the dataset and the untrained network;
* :mod:`~trajflow.recipes.t2i.objective`: :class:`TextToImageObjective`, the Trainer's objective;
* :mod:`~trajflow.recipes.t2i.sample`: :func:`generate` (raw, full and fast paths) and image grids;
* :mod:`~trajflow.recipes.t2i.bundle`: :class:`T2IModel`, a trained model ready to sample, from a training
  checkpoint (:func:`load_t2i`) or a pretrained folder (:meth:`T2IModel.from_pretrained`);
* :mod:`~trajflow.recipes.t2i.init_from_fm`: an NTM initialised from a flow-matching run (NTM §3.3);
* :mod:`~trajflow.recipes.t2i.train`: :func:`train_t2i`, a whole (resumable) run;
* :mod:`~trajflow.recipes.t2i.distill`: :func:`distill_t2i`, the learned denoiser of the fast path (NTM §3.4),
  trained by the same Trainer.
"""

from .build import build_dataset, build_model, build_transporter, dataset_captions
from .bundle import T2IModel, load_t2i, load_t2i_config
from .config import (
    T2I_DATASETS,
    DataConfig,
    ModelConfig,
    SampleConfig,
    T2IConfig,
    TextConfig,
    apply_overrides,
)
from .distill import DistillConfig, DistillObjective, DistillResult, distill_t2i
from .init_from_fm import init_ntm_from_fm
from .objective import TextToImageObjective
from .sample import DEFAULT_DENOISE_T_MIN, SAMPLE_PATHS, generate, save_image_grid
from .text import HashingTextEncoder, build_text_encoder
from .train import train_t2i
from .vae import VAE, data_shape

__all__ = [
    "T2I_DATASETS",
    "DataConfig",
    "ModelConfig",
    "TextConfig",
    "SampleConfig",
    "T2IConfig",
    "apply_overrides",
    "HashingTextEncoder",
    "build_text_encoder",
    "VAE",
    "data_shape",
    "build_dataset",
    "dataset_captions",
    "build_transporter",
    "build_model",
    "TextToImageObjective",
    "SAMPLE_PATHS",
    "DEFAULT_DENOISE_T_MIN",
    "generate",
    "save_image_grid",
    "T2IModel",
    "load_t2i",
    "load_t2i_config",
    "init_ntm_from_fm",
    "train_t2i",
    "DistillConfig",
    "DistillObjective",
    "DistillResult",
    "distill_t2i",
]
