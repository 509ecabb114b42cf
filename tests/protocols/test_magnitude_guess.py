"""The linear initial guesses of reciprocal / rsqrt (protocols/reciprocal.py), locally."""

import pytest
import torch

from cipherdm_torch.protocols.reciprocal import bucket_guess, linear_guess


def test_reciprocal_fit_on_one_octave_is_the_known_minimax():
    a, b, err = linear_guess(1.0, 2.0)
    assert a == pytest.approx(24 / 17, abs=1e-6)
    assert b == pytest.approx(8 / 17, abs=1e-6)
    assert err == pytest.approx(1 / 17, abs=1e-6)


@pytest.mark.parametrize("power", [0.5, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_bucket_guesses_are_within_the_fit_error_and_equal_ripple(power, steps):
    _, _, err = linear_guess(power, 2.0 ** (1 / steps))
    worst = 0.0
    for r in range(steps):
        a, b = bucket_guess(power, steps, r)
        m = torch.linspace(2 ** (r / steps), 2 ** ((r + 1) / steps), 2001, dtype=torch.float64)
        rel = (a - b * m) * m ** power - 1
        worst = max(worst, rel.abs().max().item())
        # equal ripple: both ends and the interior extreme reach the same error
        assert rel[0].item() == pytest.approx(-err, rel=1e-3)
        assert rel[-1].item() == pytest.approx(-err, rel=1e-3)
        assert rel.max().item() == pytest.approx(err, rel=1e-3)
    assert worst <= err * (1 + 1e-6)
    # a finer bucket is a better guess: one Newton step then suffices at 4 steps per octave
    if steps == 4 and power == 0.5:
        assert err < 1.5e-3 and 1.5 * err ** 2 < 2 ** -16
