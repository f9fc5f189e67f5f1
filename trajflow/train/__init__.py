r"""The training loop: one CPU process, one GPU, or many GPUs/machines through Hugging Face ``accelerate``.

:class:`Trainer` knows nothing about NTM. It trains any ``nn.Module`` with an *objective*: a callable
``objective(model, batch, generator, step) -> loss`` (or ``(loss, {name: value})``) whose loss is a float32 scalar.
The text-to-image lab (``examples/t2i``) builds its objective from :class:`~trajflow.TrajectoryNLL`
(NTM) or :class:`~trajflow.baselines.flow_matching.FlowMatchingLoss` (the baseline), on the same backbone.

What one optimizer step does (NTM Table 5 where it says, TarFlow/STARFlow defaults where it does not):

* ``grad_accum`` micro-batches of ``batch_size`` examples per process, the forward pass under bf16 autocast
  when ``mixed_precision="bf16"`` (the library computes log-determinants and losses in float32 regardless);
* gradients synchronised across processes (DDP or FSDP, chosen by ``accelerate launch``), clipped to
  ``grad_clip`` in global norm;
* AdamW with betas (0.9, 0.95) and decoupled weight decay on matrices only (biases and norm gains are not
  decayed), then the cosine-with-warmup learning rate of :mod:`trajflow.schedules`;
* an EMA of the weights (:mod:`trajflow.ema`).

Exact resumption. A checkpoint (see :mod:`trajflow.checkpoint` for the layout) holds the model, the EMA,
the optimizer and scheduler states, every random state of every rank (python, numpy, torch CPU and CUDA,
and the ``torch.Generator`` handed to the objective) and the position in the data: the epoch and how many
batches of it were consumed. Data order comes from :class:`ResumableSampler`, a permutation seeded by
``(seed, epoch)`` alone, so a resumed run skips exactly the consumed part of the epoch and then sees the same
batches, draws the same noise and takes the same steps as a run that was never interrupted: on the CPU the
parameters agree bit for bit (``tests/test_train.py`` checks it). Streams (``IterableDataset``, e.g. tar
shards) are re-opened at the epoch start and the consumed batches skipped. Caveat: random augmentations
drawn inside DataLoader *worker processes* (``num_workers > 0``) are seeded per worker and will differ after
a resume; with ``num_workers=0`` they come from the restored global RNG and are exact too.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> def objective(model, batch, generator, step):
    ...     (x,) = batch
    ...     return (model(x) - 1.0).square().mean()
    >>> import tempfile
    >>> cfg = TrainerConfig(max_steps=3, batch_size=4, warmup_steps=1, checkpoint_every=3, progress=False)
    >>> trainer = Trainer(cfg, tempfile.mkdtemp())
    >>> result = trainer.fit(torch.nn.Linear(2, 1), objective, TensorDataset(torch.randn(16, 2)))
    >>> result.step, result.checkpoint.name
    (3, 'step-0000003')
"""

from .config import RESUME_IGNORED_FIELDS, Objective, TrainerConfig, TrainResult
from .data_order import ResumableSampler, mix_seed
from .random_state import capture_rng_state, restore_rng_state
from .trainer import Trainer

__all__ = [
    "TrainerConfig",
    "Trainer",
    "TrainResult",
    "Objective",
    "ResumableSampler",
    "RESUME_IGNORED_FIELDS",
    "capture_rng_state",
    "restore_rng_state",
    "mix_seed",
]
