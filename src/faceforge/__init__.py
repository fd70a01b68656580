"""faceforge: train and evaluate deep face-recognition models.

Public names by package: `faceforge` (Config, load_config), `faceforge.data` (datasets, .rec/.bin files),
`faceforge.eval` (verification and IJB protocols), `faceforge.engine` (Trainer), `faceforge.models` (any model
file as a module), `faceforge.backbones` / `faceforge.heads` / `faceforge.regularizers` (build and list by name).
`import faceforge` loads only the config module (YAML, no torch): the subpackages import torch when first used.
"""

from faceforge.config import Config, config_from_dict, load_config

__version__ = "0.1.0"

__all__ = ["Config", "__version__", "config_from_dict", "load_config"]
