"""The in-memory form of a small image classification data set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImageArrays"]


# eq=False: dataclass equality would compare arrays elementwise and raise on truth testing.
@dataclass(frozen=True, eq=False)
class ImageArrays:
    """Train and test images (uint8) with int64 labels and the class names."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train_x={self.train_x.shape}, test_x={self.test_x.shape}, "
            f"classes={len(self.classes)})"
        )
