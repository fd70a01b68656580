"""GIF identity codes: uniformity spreading and balanced hierarchical k-means, plus the codes file.

These modules need only torch, so heads can use them; `faceforge.tokenizer.pipeline` (prototypes from data and
an image encoder, the `faceforge tokenize` entry) sits above data, backbones and evaluation and is not imported here.
"""

from faceforge.tokenizer.codebook import Codebook, check_codes, code_keys, load_codes, save_codes
from faceforge.tokenizer.kmeans import build_codes, code_length
from faceforge.tokenizer.spreading import gaussian_potential, neighbour_overlap, spread

__all__ = [
    "Codebook", "build_codes", "check_codes", "code_keys", "code_length", "gaussian_potential", "load_codes",
    "neighbour_overlap", "save_codes", "spread",
]
