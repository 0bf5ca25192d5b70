"""The Examples in the layer docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from structlin import list_structures

MODULES = [
    "base",
    "block_diag",
    "btt",
    "btt_moe",
    "dense",
    "einsum",
    "factorize",
    "kron",
    "low_rank",
    "monarch",
    "registry",
    "spec",
    "tt",
]
STRUCTURE_MODULES = {
    "block_diag",
    "btt",
    "btt_moe",
    "dense",
    "einsum",
    "kron",
    "low_rank",
    "monarch",
    "tt",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"structlin.layers.{name}")
    torch.manual_seed(0)
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize("structure", sorted(STRUCTURE_MODULES))
def test_every_structure_documents_shape_and_examples(structure):
    module = importlib.import_module(f"structlin.layers.{structure}")
    classes = [c for c in vars(module).values() if getattr(c, "__module__", "") == module.__name__]
    (cls,) = [c for c in classes if getattr(c, "structure", "") in list_structures()]
    doc = cls.__doc__
    for needle in ("Shape:", "Input: ``(*, H_in)``", "Output: ``(*, H_out)``", "Examples::", ">>>"):
        assert needle in doc, (cls.__name__, needle)
    assert f"{cls.__name__}(" in doc  # the example builds this class
    assert "reference" not in doc.replace("reference_forward", "")
