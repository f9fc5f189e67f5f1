"""Toy 2-D densities with exact samplers and exact bin masses (:mod:`~trajflow.data.toy.density`), their samplers
(:mod:`~trajflow.data.toy.samplers`) and closed-form CDFs (:mod:`~trajflow.data.toy.masses`)."""

from .density import TOY_DENSITIES, ToyDensity, toy_density

__all__ = ["ToyDensity", "TOY_DENSITIES", "toy_density"]
