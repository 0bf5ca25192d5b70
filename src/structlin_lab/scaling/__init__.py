"""Scaling-law tooling: collect training runs into a table and fit power laws in compute."""

from structlin_lab.scaling.fit import (
    PowerLawFit,
    bootstrap_multiplier,
    compute_frontier,
    compute_multiplier,
    compute_multipliers,
    fit_by_structure,
    fit_power_law,
    points_by_structure,
)
from structlin_lab.scaling.results import (
    collect_runs,
    format_table,
    read_metrics,
    read_run,
    write_table,
)

__all__ = [
    "PowerLawFit",
    "bootstrap_multiplier",
    "collect_runs",
    "compute_frontier",
    "compute_multiplier",
    "compute_multipliers",
    "fit_by_structure",
    "fit_power_law",
    "format_table",
    "points_by_structure",
    "read_metrics",
    "read_run",
    "write_table",
]
