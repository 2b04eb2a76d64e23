"""The mixed-precision benchmark's equivalence test (two one-sided tests on a mean of differences).

Checked against hand-worked t intervals, against the bootstrap on a large normal sample (a second
formulation that must agree there), and against the definition of the seed count it prints.
"""
from __future__ import annotations

import math

import pytest
import torch


def test_t_interval_hand_worked(bench):
    # d = 1..5: mean 3, sd sqrt(2.5) = 1.5811; t(0.95, 4) = 2.1318, t(0.975, 4) = 2.7764 (tables).
    e = bench.equivalence([1.0, 2.0, 3.0, 4.0, 5.0], margin=1.0)
    half90 = 2.131847 * math.sqrt(2.5) / math.sqrt(5)
    half95 = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert e["mean"] == pytest.approx(3.0) and e["sd"] == pytest.approx(math.sqrt(2.5))
    assert e["t90"] == pytest.approx((3 - half90, 3 + half90), abs=1e-5)
    assert e["t95"] == pytest.approx((3 - half95, 3 + half95), abs=1e-5)
    # 95 % interval [1.04, 4.96] lies wholly above +1: a difference beyond the margin is shown.
    assert e["verdict"] == "beyond" and e["seeds"] is None


def test_verdicts(bench):
    small = [0.1, -0.2, 0.15, 0.0, -0.1, 0.05, 0.2, -0.05]
    assert bench.equivalence(small)["verdict"] == "within"
    assert bench.equivalence([x - 3.0 for x in small])["verdict"] == "beyond"
    # Noisy pairs around 0: neither shown within nor beyond.
    assert bench.equivalence([3.0, -4.0, 2.5, -1.0, 4.0, -3.5])["verdict"] == "undecided"
    # Two seeds a point apart: the interval is far too wide for either verdict.
    e = bench.equivalence([0.5, 1.5], margin=1.0)
    assert e["verdict"] == "undecided"
    with pytest.raises(ValueError, match="at least 2"):
        bench.equivalence([0.3])


def test_bootstrap_agrees_with_t_on_a_large_normal_sample(bench):
    d = (torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3.0 - 0.4).tolist()
    e = bench.equivalence(d)
    width = e["t90"][1] - e["t90"][0]
    assert e["bootstrap90"][0] == pytest.approx(e["t90"][0], abs=0.05 * width)
    assert e["bootstrap90"][1] == pytest.approx(e["t90"][1], abs=0.05 * width)


def test_seed_count_is_the_smallest_that_fits(bench):
    d = [-0.4 + 3.0 * x for x in (1.2, -0.7, 0.3, -1.5, 0.9, 0.1, -0.2, 0.6, -0.9, 0.2)]
    e = bench.equivalence(d)
    room = 1.0 - abs(e["mean"])
    fits = lambda n: 1.6448536 * e["sd"] / math.sqrt(n) <= room  # noqa: E731  (z at 0.95, tables)
    assert fits(e["seeds"]) and not fits(e["seeds"] - 1)
