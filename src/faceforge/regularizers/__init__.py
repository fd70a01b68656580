"""Regularizers that perturb the input, add a loss term or reweight samples on top of any head (TopoFR lands here)."""

from faceforge.regularizers.base import RegOutput, Regularizer

__all__ = ["RegOutput", "Regularizer"]
