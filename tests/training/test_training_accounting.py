"""Accounting: Opacus RDP / PRV vs Google's dp_accounting, and DPDM's published noise levels."""

import pytest

from cipherdm_torch.training.accounting import (
    dp_accounting_epsilon,
    epsilon_spent,
    max_steps_within_budget,
    merge_history,
    noise_multiplier_for,
)

Q, STEPS, DELTA = 1 / 15, 4500, 1e-5  # DPDM MNIST: batch 4000 of 60,000, 300 epochs


def test_dpdm_mnist_eps10_rdp_sigma_and_cross_check():
    sigma = noise_multiplier_for(10.0, DELTA, Q, STEPS, "rdp")
    assert sigma == pytest.approx(2.488, abs=0.01)  # DPDM's published 2.488
    eps = epsilon_spent([(sigma, Q, STEPS)], DELTA, "rdp")
    assert 9.95 <= eps <= 10.0
    ref = dp_accounting_epsilon([(sigma, Q, STEPS)], DELTA, "rdp")  # independent implementation
    assert eps == pytest.approx(ref, rel=1e-3)
    # the same sigma at 10% fewer steps must cost strictly less
    assert epsilon_spent([(sigma, Q, int(STEPS * 0.9))], DELTA) < eps - 0.3


@pytest.mark.parametrize("eps,published", [(1.0, 18.28), (0.2, 85.0)])
def test_dpdm_small_epsilons_rdp(eps, published):
    import dp_accounting

    from cipherdm_torch.training.accounting import RDP_ORDERS

    sigma = noise_multiplier_for(eps, DELTA, Q, STEPS, "rdp")
    # at most DPDM's table and within 6% of it: the search uses a relative tolerance and RDP
    # orders up to 1024 (DPDM's stop at 63, which overstates epsilon at small budgets)
    assert published * 0.94 <= sigma <= published * 1.001
    got = epsilon_spent([(sigma, Q, STEPS)], DELTA)
    assert eps * (1 - 1e-3) <= got <= eps
    # the same orders in Google's independent implementation give the same epsilon
    acc = dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma)), STEPS))
    assert got == pytest.approx(acc.get_epsilon(DELTA), rel=1e-3)


def test_prv_matches_dp_accounting_pld():
    sigma = 2.357  # Opacus' PRV noise level for DPDM's eps-10 setting
    eps_prv = epsilon_spent([(sigma, Q, STEPS)], DELTA, "prv")
    assert eps_prv == pytest.approx(10.0, abs=0.05)
    eps_pld = dp_accounting_epsilon([(sigma, Q, STEPS)], DELTA, "pld")
    assert eps_prv == pytest.approx(eps_pld, rel=0.01)
    # PRV is tighter than RDP for the same mechanism
    assert epsilon_spent([(sigma, Q, STEPS)], DELTA, "rdp") > eps_prv + 0.3


def test_composed_history_cross_check():
    hist = [(1.1, 0.01, 300), (2.0, 0.02, 200), (1.1, 0.01, 100)]
    eps = epsilon_spent(hist, 1e-6)
    assert eps == pytest.approx(dp_accounting_epsilon(hist, 1e-6, "rdp"), rel=1e-3)
    assert epsilon_spent([], 1e-6) == 0.0


def test_max_steps_within_budget_is_tight():
    hist = [(1.0, 0.02, 50)]
    n = max_steps_within_budget(hist, 1.0, 0.02, 3.0, 1e-5)
    assert n > 0
    assert epsilon_spent(hist + [(1.0, 0.02, n)], 1e-5) <= 3.0
    assert epsilon_spent(hist + [(1.0, 0.02, n + 1)], 1e-5) > 3.0
    assert max_steps_within_budget(hist, 1.0, 0.02, 0.01, 1e-5) == 0


def test_merge_history():
    assert merge_history([(1, 0.1, 2), (1, 0.1, 3), (2, 0.1, 0), (2, 0.1, 1)]) == [
        (1.0, 0.1, 5), (2.0, 0.1, 1)]


def test_bad_inputs():
    with pytest.raises(ValueError):
        epsilon_spent([(1, 0.1, 1)], 1e-5, "gdp-typo")
    with pytest.raises(ValueError):
        noise_multiplier_for(1.0, 1e-5, 1.5, 10)
