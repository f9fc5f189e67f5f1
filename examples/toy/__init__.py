"""The toy lab: NTM against its baselines on 2-D densities (``python examples/toy/train.py``).

Modules, in the order a run uses them: ``config.py`` (:class:`~examples.toy.config.ToyConfig`), ``data.py``
(the training points), ``model.py`` (each method's model and loss), ``evaluate.py`` (held-out likelihoods and
sample distances), ``figure.py``, and ``train.py``, the script that trains every method through
:class:`trajflow.train.Trainer` and writes the figure and ``metrics.json``. ``benchmarks/toy.py`` runs the
same job over densities and seeds.

Nothing here is imported on ``import examples.toy``: import the module you need.
"""
