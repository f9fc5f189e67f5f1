r"""The toy experiment: NTM against its baselines on a 2-D density, trained and evaluated in one job.

This package is the library side of ``trajflow toy`` (:mod:`trajflow.cli`) and of ``benchmarks/toy.py``.
One call of :func:`run_toy` trains, on the same data points and for the same number of optimizer steps (or
the same wall-clock seconds, see :class:`ToyConfig`), each through :class:`trajflow.train.Trainer`:

* ``ntm``: an NTM with ``steps`` levels: a zuko NSF transporter (:class:`~trajflow.transporters.ZukoTransporter`)
  and an :class:`~trajflow.predictors.MLPPredictor`, trained on the exact trajectory NLL
  (:class:`~trajflow.TrajectoryNLL`) with :math:`t_{\min} = 0`, so that the trajectory starts at the data
  and the ELBO bounds :math:`\log p(x_0)` of the data itself;
* ``gaussian``: the same NTM with the identity transporter (every reverse step a diagonal Gaussian: the
  "Gaussian bottleneck" of the paper), same predictor;
* ``fm``: flow matching on the same residual MLP (:class:`~trajflow.velocity.MLPVelocity`), sampled
  with Euler at ``steps`` steps and at ``fm_steps_many`` steps;
* ``nsf``: a single zuko neural spline flow fitted by maximum likelihood (exact NLL).

then evaluates every method on held-out data (ELBO / exact NLL in nats per dimension) and on samples
(energy distance and sliced Wasserstein-2 to held-out data, and the total variation of a fine histogram
against the density's exact bin masses, :mod:`trajflow.metrics`), and writes a figure and ``metrics.json``.
Each method keeps the Trainer's resumable checkpoints in its own folder.

Modules: :mod:`~.config` (:class:`ToyConfig`), :mod:`~.methods` (model and objective per method),
:mod:`~.data` (the training points as a dataset), :mod:`~.train` (one method through the Trainer),
:mod:`~.evaluate`, :mod:`~.job` (:func:`run_toy`), :mod:`~.figure` (:func:`plot_toy`).
"""

from .config import METHODS, RESUME_IGNORED, ToyConfig, auto_threads
from .data import ToyTrainingSet
from .evaluate import evaluate_method
from .figure import plot_toy
from .job import ToyResult, metrics_to_rows, run_toy
from .methods import ToyObjective, build_model
from .train import (
    TrainRecord,
    train_flow_matching,
    train_gaussian,
    train_method,
    train_nsf,
    train_ntm,
    trainer_config,
)

__all__ = [
    "METHODS",
    "RESUME_IGNORED",
    "ToyConfig",
    "TrainRecord",
    "ToyResult",
    "ToyObjective",
    "ToyTrainingSet",
    "build_model",
    "trainer_config",
    "train_method",
    "train_ntm",
    "train_gaussian",
    "train_flow_matching",
    "train_nsf",
    "evaluate_method",
    "run_toy",
    "plot_toy",
    "metrics_to_rows",
    "auto_threads",
]
