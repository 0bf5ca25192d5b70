"""structlin: structured linear layers for PyTorch, trained the μP way.

Replace dense ``nn.Linear`` layers with low-rank, Kronecker, tensor-train, Monarch, Block
Tensor-Train or block-diagonal matrices that spend far less compute per unit of width.
"""

from . import aux, mup, options
from .aux import AuxOutput, add_aux_loss, add_aux_stat, clear_aux, collect_aux
from .coord import coord_check
from .layers import (
    BlockDiagLinear,
    BTTLinear,
    BTTMoELinear,
    DenseLinear,
    EinsumLinear,
    Factor,
    KronLinear,
    LowRankLinear,
    MonarchLinear,
    StructuredLinear,
    TTLinear,
    balanced_factors,
    counting_macs,
    format_spec,
    get_structure,
    is_counting_macs,
    list_structures,
    make_linear,
    mup_init_std,
    parse_spec,
    register_structure,
    structure_options,
)
from .layers.btt_moe import Routing, moe_aux_losses, route_top_k
from .linear_like import is_conv1d, is_linear_like, linear_dims
from .persist import StructureMismatchError, load_structured, read_structure, save_structured
from .structure_config import ModuleEntry, StructureConfig, structure_config
from .surgery import structurize
from .taxonomy import THETA_PRESETS, Taxonomy, Theta, parse_theta

__version__ = "0.1.0"

__all__ = [
    "THETA_PRESETS",
    "AuxOutput",
    "BTTLinear",
    "BTTMoELinear",
    "BlockDiagLinear",
    "DenseLinear",
    "EinsumLinear",
    "Factor",
    "KronLinear",
    "LowRankLinear",
    "ModuleEntry",
    "MonarchLinear",
    "Routing",
    "StructureConfig",
    "StructureMismatchError",
    "StructuredLinear",
    "TTLinear",
    "Taxonomy",
    "Theta",
    "__version__",
    "add_aux_loss",
    "add_aux_stat",
    "aux",
    "balanced_factors",
    "clear_aux",
    "collect_aux",
    "coord_check",
    "counting_macs",
    "format_spec",
    "get_structure",
    "is_conv1d",
    "is_counting_macs",
    "is_linear_like",
    "linear_dims",
    "list_structures",
    "load_structured",
    "make_linear",
    "moe_aux_losses",
    "mup",
    "mup_init_std",
    "options",
    "parse_spec",
    "parse_theta",
    "read_structure",
    "register_structure",
    "route_top_k",
    "save_structured",
    "structure_config",
    "structure_options",
    "structurize",
]
