import os
from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(os.environ.get("SMOOTHSA_GOLDEN", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden():
    """Loads one of the official golden files from ../shared/golden (or $SMOOTHSA_GOLDEN); skips when absent."""
    cache = {}

    def load(name: str) -> dict:
        path = GOLDEN_DIR / f"golden_{name}.pt"
        if not path.exists():
            pytest.skip(f"golden vectors not found at {path} (set SMOOTHSA_GOLDEN to their folder)")
        if name not in cache:
            cache[name] = torch.load(path, weights_only=True)
        return cache[name]

    return load
