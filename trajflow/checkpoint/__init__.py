"""Persistence, one home: training checkpoints and ``save_pretrained`` folders, with no pickles in either.

* a **training checkpoint** (:mod:`~trajflow.checkpoint.steps`) is a step folder written by
  :class:`~trajflow.train.Trainer`, with everything a run needs to resume exactly and a ``manifest.json`` of
  every file's size and sha256 (:mod:`~trajflow.checkpoint.manifest`);
* a **pretrained folder** (:mod:`~trajflow.checkpoint.pretrained`) is one trained model, ``model.safetensors``
  and a ``config.json`` that rebuilds it (:meth:`Pretrained.save_pretrained`, :meth:`Pretrained.from_pretrained`).

Tensors are safetensors and everything else JSON (nested states with :func:`save_state`), so reading a folder
cannot run code; every file is written atomically (:func:`atomic_write`, :mod:`~trajflow.checkpoint.files`),
and a saved config is compared field by field with the one about to use it (:func:`check_config`).
"""

from . import configs, files, manifest, pretrained, state, steps
from .configs import *  # noqa: F403
from .files import *  # noqa: F403
from .manifest import *  # noqa: F403
from .pretrained import *  # noqa: F403
from .state import *  # noqa: F403
from .steps import *  # noqa: F403

__all__ = [*files.__all__, *manifest.__all__, *state.__all__, *configs.__all__, *steps.__all__, *pretrained.__all__]
