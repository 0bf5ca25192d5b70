"""Structured linear layers. Every class honours :class:`StructuredLinear`'s contract."""

from .base import Factor, StructuredLinear, counting_macs, is_counting_macs, mup_init_std
from .block_diag import BlockDiagLinear
from .btt import BTTLinear
from .btt_moe import BTTMoELinear
from .dense import DenseLinear
from .einsum import EinsumLinear
from .factorize import WidthPlan, balanced_factors, plan_factors, plan_widths
from .kron import KronLinear
from .low_rank import LowRankLinear
from .monarch import MonarchLinear
from .registry import (
    get_structure,
    list_structures,
    make_linear,
    parse_spec,
    register_structure,
    structure_options,
)
from .spec import format_spec
from .tt import TTLinear

__all__ = [
    "BTTLinear",
    "BTTMoELinear",
    "BlockDiagLinear",
    "DenseLinear",
    "EinsumLinear",
    "Factor",
    "KronLinear",
    "LowRankLinear",
    "MonarchLinear",
    "StructuredLinear",
    "TTLinear",
    "WidthPlan",
    "balanced_factors",
    "counting_macs",
    "format_spec",
    "get_structure",
    "is_counting_macs",
    "list_structures",
    "make_linear",
    "mup_init_std",
    "parse_spec",
    "plan_factors",
    "plan_widths",
    "register_structure",
    "structure_options",
]
