"""Tests for memreason.stats: pinned values computed by hand (formulas in the docstrings) or from the
binomial distribution."""

import math

import pytest

from memreason.stats import mcnemar_exact, paired_bootstrap_ci, wilson_ci


def test_wilson_ci_matches_hand_computed_value_for_8_of_10():
    # By hand: z^2 = 3.841459, centre = (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half-width = 1.959964 * sqrt(0.016 + 0.009604) / 1.384146 = 0.226577 -> 0.4902 to 0.9433.
    lower, upper = wilson_ci(8, 10)
    assert lower == pytest.approx(0.4902, abs=5e-5)
    assert upper == pytest.approx(0.9433, abs=5e-5)


def test_wilson_ci_does_not_collapse_at_zero_or_all_successes():
    # Upper bound at 0 successes is z^2 / (n + z^2) = 3.841459 / 23.841459.
    lower, upper = wilson_ci(0, 20)
    assert lower == 0.0 and upper == pytest.approx(3.841459 / 23.841459, abs=1e-6)
    lower, upper = wilson_ci(20, 20)
    assert upper == 1.0 and lower == pytest.approx(20 / 23.841459, abs=1e-6)


def test_wilson_ci_narrows_with_n_and_widens_with_confidence():
    assert wilson_ci(50, 100)[1] - wilson_ci(50, 100)[0] < wilson_ci(5, 10)[1] - wilson_ci(5, 10)[0]
    narrow, wide = wilson_ci(30, 60, 0.9), wilson_ci(30, 60, 0.99)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


@pytest.mark.parametrize("successes,n", [(0, 0), (-1, 5), (6, 5)])
def test_wilson_ci_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError):
        wilson_ci(successes, n)


def test_mcnemar_exact_matches_binomial_tail():
    # b=1, c=6: 2 * P(X <= 1 | n=7, p=1/2) = 2 * (1 + 7) / 128.
    assert mcnemar_exact(1, 6) == pytest.approx(0.125, abs=1e-15)
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6)
    # b=0, c=10: 2 / 1024.
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024, abs=1e-15)


def test_mcnemar_exact_is_one_without_discordant_pairs_or_when_balanced():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0


def test_mcnemar_exact_handles_large_counts_exactly():
    p = mcnemar_exact(4000, 4200)
    # Normal approximation with continuity correction: chi2 = (|b-c|-1)^2/(b+c) = 199^2/8200.
    approx = math.erfc(math.sqrt(199 ** 2 / 8200) / math.sqrt(2))
    assert 0 < p < 1 and p == pytest.approx(approx, rel=0.05)


def test_mcnemar_exact_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap_ci_is_seeded_and_contains_the_observed_difference():
    first = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1] * 3
    second = [1, 1, 1, 1, 0, 1, 1, 0, 1, 1] * 3
    result = paired_bootstrap_ci(first, second, seed=3, n_resamples=2000)
    assert result == paired_bootstrap_ci(first, second, seed=3, n_resamples=2000)
    assert result != paired_bootstrap_ci(first, second, seed=4, n_resamples=2000)
    observed, lower, upper = result
    assert observed == pytest.approx(0.2)
    assert 0.0 <= lower < observed < upper <= 0.5


def test_paired_bootstrap_ci_is_a_point_when_every_difference_is_equal():
    observed, lower, upper = paired_bootstrap_ci([0.0, 1.0, 2.0], [2.0, 3.0, 4.0], n_resamples=100)
    assert observed == lower == upper == 2.0


def test_paired_bootstrap_ci_uses_the_pairing():
    # Identical samples in a different order: unpaired they look the same, paired every difference is +-1.
    first = [0, 1] * 20
    second = [1, 0] * 20
    observed, lower, upper = paired_bootstrap_ci(first, second, n_resamples=2000)
    assert observed == 0.0 and lower < -0.1 and upper > 0.1


def test_paired_bootstrap_ci_rejects_unpaired_or_empty_input():
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1, 0], [1])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([], [])
