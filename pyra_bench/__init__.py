"""pyra_bench: training-inference efficient task adaptation of ViTs (PYRA, ECCV 2024) and its baselines."""

__version__ = "0.1.0"
