"""The baselines NTM is measured against, on the same data and budget: flow matching (Euler/Heun ODE samplers)."""

from .flow_matching import FlowMatchingLoss, euler_sample, heun_sample

__all__ = ["FlowMatchingLoss", "euler_sample", "heun_sample"]
