"""faceforge: train and evaluate deep face-recognition models."""

__version__ = "0.1.0"
