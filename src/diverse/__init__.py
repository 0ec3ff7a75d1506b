"""diverse: diverse Bayesian deep ensembles in PyTorch."""

__version__ = "0.1.0"
