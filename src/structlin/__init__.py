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
from .surgery import structurize

__version__ = "0.1.0"

__all__ = [
    "BTTLinear",
    "BlockDiagLinear",
    "DenseLinear",
    "Factor",
    "KronLinear",
    "LowRankLinear",
    "MonarchLinear",
    "StructuredLinear",
    "TTLinear",
    "__version__",
    "balanced_factors",
    "coord_check",
    "format_spec",
    "get_structure",
    "is_conv1d",
    "is_linear_like",
    "linear_dims",
    "list_structures",
    "make_linear",
    "mup",
    "mup_init_std",
    "options",
    "parse_spec",
    "register_structure",
    "structure_options",
    "structurize",
]
