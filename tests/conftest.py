import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. It reads this variable
# when a kernel is defined, so it is set before anything imports `smoothsa.kernels`. Model tests run the
# PyTorch reference by default; kernel tests ask for the fused path explicitly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SMOOTHSA_FUSED", "0")

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
