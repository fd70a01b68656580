"""Regularizers that add a loss term or reweight samples on top of any head (TopoFR lands here)."""

from faceforge.regularizers.base import RegOutput

__all__ = ["RegOutput"]
