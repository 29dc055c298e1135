"""Sampling metrics for evaluation: the unbiased pass@k estimator and its mean over problems.

pass@k is the chance that at least one of k answers, drawn without replacement from n sampled
answers of which c are correct, is correct (Chen et al., 2021, "Evaluating Large Language Models
Trained on Code", arXiv:2107.03374). Sampling n >= k answers and using this estimator has far lower
variance than sampling exactly k.
"""

from __future__ import annotations

__all__ = ["mean_pass_at_k", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct answers out of ``n`` samples.

    >>> round(pass_at_k(n=5, c=2, k=2), 6)  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    0.7
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0  # every draw of k must include a correct answer
    # pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)
    # The product form never builds the huge binomials, so it stays exact-ish for large n.
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean_pass_at_k(correct_counts: list[int], n: int, k: int) -> float:
    """Mean pass@k over problems; ``correct_counts[i]`` of problem i's ``n`` samples passed."""
    if not correct_counts:
        raise ValueError("correct_counts is empty")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
