import numpy as np
import pytest
import torch

from smoothsa.dataio.records import encode_jpeg, encode_png


@pytest.fixture(scope="session")
def coco_record():
    """A hand-made 256x256 panoptic COCO record (no resize in validation) and its segment ids: 1 stuff,
    2 thing, 3 stuff, 4 thing, 5 thing (absent from the image), 0 unannotated. Read-only: tests share it."""
    segment = np.zeros((256, 256), np.uint8)
    segment[:100] = 1
    segment[100:, :128] = 3
    segment[10:20, 30:60] = 2
    segment[200:251, 140:150] = 4
    record = dict(
        image=encode_jpeg(np.full((256, 256, 3), 128, np.uint8)),
        segment=encode_png(segment),
        clazz=np.array([184, 1, 190, 3, 5], np.uint8),
        isthing=np.array([False, True, False, True, True]),
    )
    return record, segment


@pytest.fixture(scope="session")
def same_batches():
    """Compares two loaders batch by batch and returns how many batches they gave: the same keys, shapes and
    dtypes, every tensor but the pixels equal, the pixels checked by `assert_pixels_close(a, b)`."""

    def compare(loader_a, loader_b, pixel_key: str, assert_pixels_close) -> int:
        count = 0
        for a, b in zip(loader_a, loader_b, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
                if key != pixel_key:
                    assert torch.equal(a[key], b[key]), key
            assert_pixels_close(a[pixel_key], b[pixel_key])
            count += 1
        return count

    return compare
