"""Unit tests for palaestra.evaluation.metrics: pass@k against values worked by hand."""

import math

import pytest

from palaestra.evaluation.metrics import mean_pass_at_k, pass_at_k


def test_pass_at_1_is_fraction_correct():
    # 1 - C(3, 1) / C(5, 1) = 1 - 3/5 = 0.4
    assert pass_at_k(n=5, c=2, k=1) == pytest.approx(0.4)


def test_pass_at_2():
    # 1 - C(3, 2) / C(5, 2) = 1 - 3/10 = 0.7
    assert pass_at_k(n=5, c=2, k=2) == pytest.approx(0.7)


def test_no_correct_is_zero():
    assert pass_at_k(n=5, c=0, k=3) == 0.0


def test_too_few_wrong_answers_is_one():
    # n - c = 1 < k = 2: any 2 of the 5 answers include a correct one
    assert pass_at_k(n=5, c=4, k=2) == 1.0


def test_large_n_is_stable_and_exact():
    # 1 - C(199, 100) / C(200, 100) = 1 - 100/200 = 0.5, with binomials around 1e58
    assert pass_at_k(n=200, c=1, k=100) == pytest.approx(0.5)
    expected = 1 - math.comb(150, 10) / math.comb(200, 10)
    assert pass_at_k(n=200, c=50, k=10) == pytest.approx(expected, rel=1e-12)


def test_errors():
    with pytest.raises(ValueError):
        pass_at_k(n=3, c=1, k=4)
    with pytest.raises(ValueError):
        pass_at_k(n=3, c=4, k=1)
    with pytest.raises(ValueError):
        mean_pass_at_k([], n=3, k=1)


def test_mean_pass_at_k():
    # (0.4 + 0.0 + 1.0) / 3 = 0.466667
    assert mean_pass_at_k([2, 0, 5], n=5, k=1) == pytest.approx(1.4 / 3)
