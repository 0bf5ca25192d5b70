"""structlin: structured linear layers for PyTorch, trained the μP way.

Replace dense ``nn.Linear`` layers with low-rank, Kronecker, tensor-train, Monarch, Block
Tensor-Train or block-diagonal matrices that spend far less compute per unit of width.
"""

from . import mup, options
from .coord import coord_check
from .layers import (
    BlockDiagLinear,
    BTTLinear,
    DenseLinear,
    EinsumLinear,
    Factor,
    KronLinear,
    LowRankLinear,
    MonarchLinear,
    StructuredLinear,
    TTLinear,
    balanced_factors,
    format_spec,
    get_structure,
    list_structures,
    make_linear,
    mup_init_std,
    parse_spec,
    register_structure,
    structure_options,
)
from .linear_like import is_conv1d, is_linear_like, linear_dims
from .persist import StructureMismatchError, load_structured, read_structure, save_structured
from .structure_config import ModuleEntry, StructureConfig, structure_config
from .surgery import structurize
from .taxonomy import THETA_PRESETS, Taxonomy, Theta, parse_theta

__version__ = "0.1.0"

__all__ = [
    "THETA_PRESETS",
    "BTTLinear",
    "BlockDiagLinear",
    "DenseLinear",
    "EinsumLinear",
    "Factor",
    "KronLinear",
    "LowRankLinear",
    "ModuleEntry",
    "MonarchLinear",
    "StructureConfig",
    "StructureMismatchError",
    "StructuredLinear",
    "TTLinear",
    "Taxonomy",
    "Theta",
    "__version__",
    "balanced_factors",
    "coord_check",
    "format_spec",
    "get_structure",
    "is_conv1d",
    "is_linear_like",
    "linear_dims",
    "list_structures",
    "load_structured",
    "make_linear",
    "mup",
    "mup_init_std",
    "options",
    "parse_spec",
    "parse_theta",
    "read_structure",
    "register_structure",
    "save_structured",
    "structure_config",
    "structure_options",
    "structurize",
]
