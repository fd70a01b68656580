"""Topological summaries of point clouds for training losses (TopoFR's PTSA)."""

from faceforge.topology.persistence import persistence0

__all__ = ["persistence0"]
