import hashlib

import pytest

from smoothsa.dataio import write_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic image dataset (24 training, 8 validation scenes of 40×40) in the official layout."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, "train", num=24, height=40, width=40, seed=1)
    write_synthetic(root, "val", num=8, height=40, width=40, seed=2)
    return root


@pytest.fixture
def hashes():
    """`hashes(folder)`: every file under `folder` (relative path → sha256), what a refusal must leave as it was."""
    def of(folder) -> dict:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    return of
