r"""The training loop: one CPU process, one GPU, or many GPUs/machines through Hugging Face ``accelerate``.

:class:`Trainer` knows nothing about NTM: it trains any ``nn.Module`` with an *objective*
``objective(model, batch, generator, step) -> loss`` (or ``(loss, {name: value})``), a float32 scalar, e.g.
built from :class:`~trajflow.TrajectoryNLL` or :class:`~trajflow.baselines.flow_matching.FlowMatchingLoss`.

One optimizer step (NTM Table 5 where it says, TarFlow/STARFlow defaults where it does not): ``grad_accum``
micro-batches of ``batch_size`` examples per process (under bf16 autocast with ``mixed_precision="bf16"``;
log-determinants and losses stay float32); gradients synchronised (DDP or FSDP, as ``accelerate launch``
chooses) and clipped to ``grad_clip`` in global norm; AdamW, betas (0.9, 0.95), weight decay on matrices only;
the cosine-with-warmup learning rate of :mod:`trajflow.schedules`; an EMA of the weights (:mod:`trajflow.ema`).

Exact resumption. A checkpoint (layout: :mod:`trajflow.checkpoint`) holds the model, the EMA, the optimizer
and scheduler states, every random state of every rank (python, numpy, torch CPU and CUDA, and the objective's
``torch.Generator``) and the position in the data. Data order comes from :class:`ResumableSampler`, a
permutation seeded by ``(seed, epoch)`` alone, so a resumed run sees the same batches, draws the same noise and
takes the same steps as an uninterrupted one: on the CPU the parameters agree bit for bit
(``tests/test_train.py``). Streams (``IterableDataset``) are re-opened at the epoch start and the consumed
batches skipped. Caveat: random augmentations inside DataLoader *worker processes* (``num_workers > 0``) differ
after a resume; with ``num_workers=0`` they come from the restored global RNG and are exact too.

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
