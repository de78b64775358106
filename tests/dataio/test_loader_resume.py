"""A resumed epoch continues with exactly the batches a run had not seen yet, on every loader."""
import pytest
import torch

from smoothsa.dataio import ClevrTex, LoaderOptions, make_loader, write_synthetic


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("resume"), "train", num=20, height=48, width=48)


def _loader(path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    return make_loader(ClevrTex(path, is_training=True, resolution=32), LoaderOptions(batch_size=4, seed=3, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "torch-gpu", "dali"])
def test_skip_batches_resumes_mid_epoch(split, backend):
    loader = _loader(split, backend)
    loader.set_epoch(2)
    full = [b["image"] for b in loader]
    resumed = _loader(split, backend)
    resumed.set_epoch(2, skip_batches=3)
    rest = [b["image"] for b in resumed]
    assert len(full) == 5 and len(rest) == 2
    for a, b in zip(full[3:], rest):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len([b for b in resumed]) == 5  # the next epoch is whole again
