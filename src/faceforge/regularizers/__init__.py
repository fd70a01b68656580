"""Regularizers that perturb the input, add a loss term or reweight samples on top of any head (TopoFR lands here)."""

from faceforge.registry import REGULARIZERS
from faceforge.regularizers.base import RegOutput, Regularizer
from faceforge.regularizers.topofr import TopoFR

__all__ = ["RegOutput", "Regularizer", "TopoFR", "list_regularizers"]


def list_regularizers() -> list[str]:
    """The registered regularizer names, sorted (what each `regularizers[i].name` accepts)."""
    return REGULARIZERS.names()
