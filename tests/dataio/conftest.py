import numpy as np
import pytest

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
