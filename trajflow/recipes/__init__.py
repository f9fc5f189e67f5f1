"""Recipes: complete, configurable jobs built on the library (each a package of small modules).

* :mod:`trajflow.recipes.toy`: the 2-D toy densities, NTM against its baselines;
* :mod:`trajflow.recipes.t2i`: text-to-image training, sampling and distillation.

The library underneath (process, distribution, model, transporters, predictors, the Trainer) knows nothing
about them.
"""
