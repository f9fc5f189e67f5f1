"""The lab: how this project runs its experiments with the library (``trajflow``), one folder per experiment.

A package only so that the experiments' modules import by a full name (``examples.t2i.model``,
``examples.toy.config``) from the repository root, the tests and ``benchmarks/`` without two ``config.py``
colliding; a script run as ``python examples/<name>/<script>.py`` puts the repository root on ``sys.path``
first. Not part of the installed wheel (``pyproject.toml`` packages ``trajflow`` only).
"""
