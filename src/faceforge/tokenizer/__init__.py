"""GIF identity codes: uniformity spreading and balanced hierarchical k-means, plus the codes file.

These modules need only torch, so heads can use them. What runs an encoder over a training set to make the
prototypes (`faceforge.engine.prototypes`, `faceforge.engine.tokenize`: the `faceforge tokenize` command) needs
data, models and evaluation, so it lives in engine/, above heads.
"""

from faceforge.tokenizer.codebook import Codebook, check_codes, code_keys, load_codes, save_codes
from faceforge.tokenizer.kmeans import build_codes, code_length
from faceforge.tokenizer.spreading import gaussian_potential, neighbour_overlap, spread

__all__ = [
    "Codebook", "build_codes", "check_codes", "code_keys", "code_length", "gaussian_potential", "load_codes",
    "neighbour_overlap", "save_codes", "spread",
]
