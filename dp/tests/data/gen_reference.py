"""Generates the reference values the dp crate's tests compare against.

Run once with Google's dp-accounting (pip install dp-accounting; 0.6.x was used):
    python3 gen_reference.py > rdp_reference.json
Values: epsilon of the Poisson-subsampled Gaussian mechanism composed `steps` times at `delta`,
from dp-accounting's RdpAccountant (default orders) and, on a subset, its PLDAccountant
(pessimistic estimate, value discretization 1e-3), and the optimistic PLD of the same mechanism
(value discretization 1e-4), a lower bound on the true epsilon.
"""
import json
import math
import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from dp_accounting.pld import pld_privacy_accountant as pld
from dp_accounting.pld import privacy_loss_distribution as pldlib

QS = [0.001, 0.004, 0.01, 0.05, 0.1, 0.3, 1.0]
SIGMAS = [0.5, 0.7, 1.0, 1.5, 2.0, 4.0, 10.0]
STEPS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-5]

def event(q, sigma, steps):
    g = dp_event.GaussianDpEvent(sigma)
    e = g if q == 1.0 else dp_event.PoissonSampledDpEvent(q, g)
    return dp_event.SelfComposedDpEvent(e, steps)

rows = []
for q in QS:
    for s in SIGMAS:
        for t in STEPS:
            for d in DELTAS:
                acc = rdp.RdpAccountant()
                acc.compose(event(q, s, t))
                eps, order = acc.get_epsilon_and_optimal_order(d)
                row = {"q": q, "sigma": s, "steps": t, "delta": d,
                       "rdp_epsilon": eps if math.isfinite(eps) else None,
                       "rdp_order": order}
                if t <= 1000 and (q >= 0.01 or t <= 100) and eps < 30:
                    p = pld.PLDAccountant(value_discretization_interval=1e-3)
                    p.compose(event(q, s, t))
                    row["pld_epsilon"] = p.get_epsilon(d)
                    # optimistic PLD: a lower bound on the true epsilon (no accountant may
                    # report less)
                    o = pldlib.from_gaussian_mechanism(
                        standard_deviation=s, sampling_prob=q,
                        pessimistic_estimate=False, value_discretization_interval=1e-4)
                    row["pld_optimistic_epsilon"] = o.self_compose(t).get_epsilon_for_delta(d)
                rows.append(row)
print(json.dumps({"source": f"dp-accounting {getattr(dp_accounting, '__version__', '?')}",
                  "rows": rows}, indent=0))
