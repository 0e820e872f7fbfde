"""The claims section's statistics: the t interval, the Welch difference, and which runs count as
diverged, against hand computations."""
import math

from experiments import soft_alignment_claims as claims


def test_interval_is_the_95_percent_t_interval():
    mean, half = claims.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # s = sqrt(2.5), t_{0.975, 4} = 2.776445
    assert mean == 3.0 and math.isclose(half, 2.776445 * math.sqrt(2.5) / math.sqrt(5), rel_tol=1e-5)
    assert math.isnan(claims.interval([1.0])[1])


def test_difference_excludes_zero_only_for_separated_samples():
    gap, low, high = claims.difference([10.0, 10.1, 9.9], [5.0, 5.2, 4.8])
    assert math.isclose(gap, 5.0) and 0 < low < 5 < high
    assert claims._better([1.0, 2.0, 3.0], [1.5, 2.5, 2.0]) == "no difference"
    assert claims._better([1.0, 1.1, 0.9], [5.0, 5.2, 4.8], larger=False) == "smaller"


def test_a_finite_exploded_loss_counts_as_diverged():
    def run(losses, state="done"):
        return {"state": state, "name": "fa-seed0", "labels": {"feedback": "fa"},
                "records": [{"train_loss": v} for v in losses]}
    assert claims.exploded(run([1.8, 0.6, 1e18]))
    assert not claims.exploded(run([1.8, 0.6, 0.5]))
    failed = claims.diverged([run([1.8, 1e18]), run([1.8], "diverged"), run([1.8, 0.4])])
    assert failed == {"fa": ["fa-seed0 (final loss 1e+18)", "fa-seed0 (non-finite)"]}
