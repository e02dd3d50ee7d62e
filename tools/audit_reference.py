"""Reference values for dp/src/audit.rs: a direct transcription of the one-run audit's p-value
and ε lower bound from Steinke, Nasr and Jagielski (2023), Appendix D, with exact binomials from
the standard library (no scipy). Run: python3 tools/audit_reference.py"""
import math
from fractions import Fraction


def binom_pmf(k, r, q):
    return math.comb(r, k) * q**k * (1 - q) ** (r - k)


def p_value_dp_audit(m, r, v, eps, delta):
    assert 0 <= v <= r <= m
    q = 1 / (1 + math.exp(-eps))
    beta = sum(binom_pmf(k, r, q) for k in range(v, r + 1))
    alpha = 0.0
    total = 0.0
    for i in range(1, v + 1):
        total += binom_pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


def get_eps_audit(m, r, v, delta, p):
    if p_value_dp_audit(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp_audit(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if p_value_dp_audit(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


if __name__ == "__main__":
    print("P_1000_100_80_1", repr(p_value_dp_audit(1000, 100, 80, 1.0, 1e-5)))
    print("P_1000_100_60_05", repr(p_value_dp_audit(1000, 100, 60, 0.5, 1e-5)))
    print("P_1000_200_200_5", repr(p_value_dp_audit(1000, 200, 200, 5.0, 0.0)))
    print("E_1000_100_80", repr(get_eps_audit(1000, 100, 80, 1e-5, 0.05)))
    print("E_1000_1000_1000", repr(get_eps_audit(1000, 1000, 1000, 1e-5, 0.05)))
    print("E_1000_200_120", repr(get_eps_audit(1000, 200, 120, 1e-5, 0.05)))
