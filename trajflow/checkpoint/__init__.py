"""Persistence, one home: training checkpoints and ``save_pretrained`` folders, with no pickles in either.

Two folder formats share one set of file tools:

* a **training checkpoint** is a step folder written by :class:`~trajflow.train.Trainer`
  (:mod:`~trajflow.checkpoint.steps`): the model, the EMA, the optimizer, scheduler and random states and
  ``manifest.json``, which records every file's size and sha256 (:mod:`~trajflow.checkpoint.manifest`);
  everything a run needs to resume exactly;
* a **pretrained folder** (:mod:`~trajflow.checkpoint.pretrained`) is one trained model:
  ``model.safetensors`` and a ``config.json`` that rebuilds the untrained model and records the weights'
  sha256, written by :meth:`Pretrained.save_pretrained` and read by :meth:`Pretrained.from_pretrained`.

Nothing in either is a pickle: tensors are safetensors, everything else JSON (nested states such as an
optimizer's with :func:`save_state`), so reading a folder cannot run code. Every file is written atomically
(:func:`atomic_write`, :mod:`~trajflow.checkpoint.files`), and a saved config is compared field by field with
the one about to use it (:func:`check_config`, :mod:`~trajflow.checkpoint.configs`).
"""

from .configs import check_config, check_config_keys, check_renamed_fields, config_differences, dataclass_from_dict
from .files import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    atomic_write,
    file_sha256,
    load_json,
    load_safetensors,
    load_torch,
    save_json,
    save_safetensors,
    save_torch,
)
from .manifest import MANIFEST_FILE, TRAINER_FILE, DamagedCheckpointError, verify_checkpoint, write_manifest
from .pretrained import (
    PRETRAINED_FORMAT,
    Pretrained,
    build_part,
    load_pretrained_weights,
    part_config,
    read_pretrained_config,
)
from .state import load_state, save_state
from .steps import CheckpointDir, load_model_weights, resolve_checkpoint, save_model

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "EMA_FILE",
    "MANIFEST_FILE",
    "TRAINER_FILE",
    "DamagedCheckpointError",
    "atomic_write",
    "save_json",
    "load_json",
    "save_torch",
    "load_torch",
    "save_safetensors",
    "load_safetensors",
    "save_state",
    "load_state",
    "file_sha256",
    "write_manifest",
    "verify_checkpoint",
    "config_differences",
    "check_config",
    "check_config_keys",
    "check_renamed_fields",
    "dataclass_from_dict",
    "CheckpointDir",
    "resolve_checkpoint",
    "save_model",
    "load_model_weights",
    "Pretrained",
    "PRETRAINED_FORMAT",
    "read_pretrained_config",
    "part_config",
    "build_part",
    "load_pretrained_weights",
]
