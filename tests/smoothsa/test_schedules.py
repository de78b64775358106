import math

import pytest

from smoothsa.schedules import detach_flag, linear_warmup_cosine


def _official_cb_linear_cosine(nlin: int, ntotal: int, vstart: float, vbase: float, vfinal: float) -> list[float]:
    """The official CbLinearCosine table (docs/official.md §4), rebuilt from its two formulas."""
    ncos = ntotal - nlin
    linear = [(vbase - vstart) / nlin * n + vstart for n in range(nlin + 1)]
    cosine = [0.5 * (vbase - vfinal) * (1 + math.cos(math.pi * n / ncos)) + vfinal for n in range(1, ncos + 1)]
    return linear + cosine


def test_lr_key_points():
    total, base = 50_000, 2e-4
    nlin = total // 20
    assert linear_warmup_cosine(0, total, base) == 0.0
    assert linear_warmup_cosine(nlin // 2, total, base) == pytest.approx(base / 2, rel=1e-12)
    assert linear_warmup_cosine(nlin, total, base) == pytest.approx(base, rel=1e-12)
    assert linear_warmup_cosine(total, total, base) == pytest.approx(base / 1000, rel=1e-12)
    middle = nlin + (total - nlin) // 2
    assert linear_warmup_cosine(middle, total, base) == pytest.approx((base + base / 1000) / 2, rel=1e-12)


def test_lr_matches_official_table():
    total, base = 1000, 5e-5
    table = _official_cb_linear_cosine(total // 20, total, 0.0, base, base / 1e3)
    assert len(table) == total + 1
    ours = [linear_warmup_cosine(s, total, base) for s in range(total + 1)]
    assert ours == pytest.approx(table, rel=1e-14, abs=0.0)
    # Rises strictly during warm-up, then never increases.
    assert all(a < b for a, b in zip(ours[:50], ours[1:51]))
    assert all(a >= b for a, b in zip(ours[50:], ours[51:]))


def test_lr_custom_arguments_and_range():
    assert linear_warmup_cosine(0, 100, 1.0, warmup=10, start=0.5, final=0.1) == 0.5
    assert linear_warmup_cosine(5, 100, 1.0, warmup=10, start=0.5, final=0.1) == pytest.approx(0.75)
    assert linear_warmup_cosine(100, 100, 1.0, warmup=10, start=0.5, final=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        linear_warmup_cosine(101, 100, 1.0)


def test_detach_flag_boundary():
    total = 50_000
    assert detach_flag(0, total) is True
    assert detach_flag(4999, total) is True
    assert detach_flag(5000, total) is False
    assert detach_flag(total, total) is False
    # The boundary is total // 10 (integer), as in the configs.
    assert detach_flag(1, 15) is False and detach_flag(0, 15) is True


def test_detach_flag_default_fraction_is_total_div_10_for_every_total():
    for total in range(1, 3001):
        boundary = total // 10
        if boundary:
            assert detach_flag(boundary - 1, total) is True
        assert detach_flag(boundary, total) is False


def test_detach_flag_other_fractions():
    assert all(detach_flag(s, 300, fraction=1.0) for s in range(301))
    assert not any(detach_flag(s, 300, fraction=0.0) for s in range(301))
    assert detach_flag(149, 300, fraction=0.5) and not detach_flag(150, 300, fraction=0.5)
    assert detach_flag(0, 7, fraction=0.5) and detach_flag(2, 7, fraction=0.5) and not detach_flag(3, 7, fraction=0.5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            detach_flag(0, 10, fraction=bad)
