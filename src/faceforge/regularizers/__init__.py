"""Regularizers that perturb the input, add a loss term or reweight samples on top of any head (TopoFR lands here)."""

from faceforge.regularizers.base import RegOutput, Regularizer
from faceforge.regularizers.topofr import TopoFR

__all__ = ["RegOutput", "Regularizer", "TopoFR"]
