"""``cbam.convert``: checkpoints between ours, the official CBAM code's and timm's, in both directions.

- ``from_official(sd)``, ``from_timm(sd)``, ``to_official(sd)``, ``to_timm(sd)``: key rules (``rules``)
- ``load_weights(path_or_dict, model) -> LoadReport``: read, detect, convert, load (``load``), with
  the reading in ``read`` (weights-only pickles, safetensors, where the state dict is, wrapper
  prefixes) and the detection in ``layout``
- ``save_weights(path, sd)``: ``.safetensors`` or ``.pt``, atomically (``write``)
"""

from .layout import Layout, detect
from .load import LoadReport, as_ours, load_weights
from .read import find_state_dict, read_file, strip_wrappers
from .rules import from_official, from_timm, to_official, to_timm
from .write import save_weights

__all__ = [
    "Layout", "LoadReport", "as_ours", "detect", "find_state_dict", "from_official", "from_timm", "load_weights",
    "read_file", "save_weights", "strip_wrappers", "to_official", "to_timm",
]
