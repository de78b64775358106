"""Loader worker processes: the default count, and the memory they keep."""

import os
import subprocess
import sys
import textwrap

from smoothsa.dataio.synthetic import write_synthetic
from smoothsa.dataio.workers import default_workers


def test_default_workers(monkeypatch):
    for cpus, expected in [(1, 0), (2, 1), (8, 7), (16, 15), (64, 15)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cpus: set(range(n)), raising=False)
        assert default_workers() == expected


FAULTS_PER_SAMPLE = textwrap.dedent("""
    import resource, sys
    from smoothsa.dataio import COCO
    from smoothsa.dataio.device_loader import RawSamples
    from smoothsa.dataio.workers import keep_freed_memory
    if sys.argv[2] == "keep":
        assert keep_freed_memory()
    samples = RawSamples(COCO(sys.argv[1], is_training=True, mode="instance"), seed=0)
    batch = list(range(8))
    samples.__getitems__(batch)  # the same records again below: their file pages are mapped by now
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        samples.__getitems__(batch)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 64)
""")


def test_kept_memory_spares_the_page_faults(tmp_path):
    """A worker's batches of 480x640 samples reuse the pages of the last ones (glibc's defaults map and
    fault them afresh): counted as minor page faults per sample, in fresh processes."""
    path = write_synthetic(tmp_path, "train", num=8, height=480, width=640, image_format="jpeg")

    def faults(policy: str) -> float:
        run = subprocess.run([sys.executable, "-c", FAULTS_PER_SAMPLE, str(path), policy],
                             capture_output=True, text=True, check=True)
        return float(run.stdout)

    kept, default = faults("keep"), faults("default")
    assert kept < default / 4, (kept, default)
