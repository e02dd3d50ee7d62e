#!/usr/bin/env python3
"""The comparison table of a client-level DP sweep (simulations/configs/client_dp_lm.toml).

Reads OUT/summary.csv and OUT/rounds.csv written by `fedlora simulate` and prints, per privacy
setting and target epsilon: the final held-out loss (mean +- sd over seeds), the share of the
non-private gain it keeps (per seed against the mean non-private final loss), the upload per
participating client per round, epsilon (a) and the largest epsilon (b) of any client.

    python3 tools/client_dp_table.py OUT [BASELINE_OUT] > OUT/table.md

A sweep without a non-private run (epsilon = inf) takes the non-private final loss from
BASELINE_OUT's. After the table, each distributed setting is compared with central at the same
epsilon: the difference of the mean final losses, central's sd over seeds, whether distributed is
within one sd of central ("ahead" when its loss is lower by more than that), and the difference
per seed (the seed fixes the data split, the sample and the initialization in both).

A tuning sweep that varies more than privacy, epsilon and seed (clip, rank, learning rate, ...)
gets one row per setting, labelled `privacy name=value ...`, and each distributed setting is
compared with the central one of the same values. The non-private loss is still the mean of every
non-private run.
"""

import csv
import statistics
import sys
from collections import defaultdict

# summary.csv columns that a sweep may vary besides privacy, epsilon and seed
AXES = [
    "clip",
    "rank",
    "clients_per_round",
    "rounds",
    "strategy",
    "local_steps",
    "batch_size",
    "learning_rate",
]


def main(out: str, baseline: str | None = None) -> None:
    sums = list(csv.DictReader(open(f"{out}/summary.csv")))
    rounds = list(csv.DictReader(open(f"{out}/rounds.csv")))
    last_b = {}
    per_round_up = defaultdict(list)
    for r in rounds:
        if r["status"] != "committed":
            continue
        if r["eps_coordinator"]:
            last_b[r["run"]] = r["eps_coordinator"]
        if int(r["aggregated"]) > 0:
            per_round_up[r["run"]].append(int(r["bytes_up"]) / int(r["aggregated"]))
    base = [float(s["final_loss"]) for s in sums if s["epsilon"] == "inf"]
    source = ""
    if not base and baseline:
        other = csv.DictReader(open(f"{baseline}/summary.csv"))
        base = [float(s["final_loss"]) for s in other if s["epsilon"] == "inf"]
        source = f" of {baseline}"
    if not base:
        sys.exit("no non-private run (epsilon = inf) in the sweep or its baseline")
    nonpriv = statistics.mean(base)
    # settings that vary among the private runs besides privacy and epsilon (a tuning sweep) are
    # kept apart, as `name=value` after the privacy label
    varied = [
        c
        for c in AXES
        if len({s[c] for s in sums if s["epsilon"] != "inf"}) > 1
    ]
    groups = defaultdict(list)
    for s in sums:
        setting = tuple(f"{c}={s[c]}" for c in varied)
        groups[(s["privacy"] or "example", setting, s["epsilon"])].append(s)
    order = {"example": 0, "central": 1}

    def key(k):
        p, setting, e = k
        return (float("inf") if e == "inf" else float(e), order.get(p, 2), p, setting)

    def label(p, setting):
        return " ".join((p,) + setting)

    def pm(v, d):
        if len(v) == 1:
            return f"{v[0]:.{d}f}"
        return f"{statistics.mean(v):.{d}f} ± {statistics.stdev(v):.{d}f}"

    print(
        "| target ε | privacy | seeds | final loss | share of the non-private gain | "
        "upload per client per round | ε (a) | ε (b), largest |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (p, setting, e) in sorted(groups, key=key):
        runs = groups[(p, setting, e)]
        loss = [float(r["final_loss"]) for r in runs]
        kept = [
            100.0 * (float(r["initial_loss"]) - float(r["final_loss"]))
            / (float(r["initial_loss"]) - nonpriv)
            for r in runs
        ]
        up = [statistics.mean(per_round_up[r["run"]]) / 1024 for r in runs if per_round_up[r["run"]]]
        eps_a = [float(r["eps_spent"]) for r in runs if r["eps_spent"]]
        b = [last_b.get(r["run"], "") for r in runs]
        b_txt = "-" if not any(b) else ("∞" if "inf" in b else f"{max(float(x) for x in b if x):.1f}")
        print(
            f"| {e} | {label(p, setting)} | {len(runs)} | {pm(loss, 4)} | {pm(kept, 0)} % | "
            f"{pm(up, 1)} KiB | {pm(eps_a, 2) if eps_a else '-'} | {b_txt} |"
        )
    print(
        f"\nNon-private final loss {nonpriv:.4f} (mean of {len(base)} seeds"
        f"{source}); "
        f"initial {float(sums[0]['initial_loss']):.4f}."
    )
    lines = []
    for (p, setting, e) in sorted(groups, key=key):
        if not p.startswith("distributed") or ("central", setting, e) not in groups:
            continue
        cen = {r["seed"]: float(r["final_loss"]) for r in groups[("central", setting, e)]}
        dis = {r["seed"]: float(r["final_loss"]) for r in groups[(p, setting, e)]}
        gap = statistics.mean(dis.values()) - statistics.mean(cen.values())
        sd = statistics.stdev(cen.values()) if len(cen) > 1 else None
        paired = [dis[k] - cen[k] for k in sorted(dis) if k in cen]
        # the goal is to reach central's loss to within one sd: lower (better) by more is "ahead";
        # with one central seed there is no sd, and so no verdict
        if sd is None:
            verdict = "-"
        elif abs(gap) <= sd:
            verdict = "within"
        else:
            verdict = "ahead" if gap < 0 else "not within"
        lines.append(
            f"| {e} | {label(p, setting)} | {gap:+.4f} | {'-' if sd is None else f'{sd:.4f}'} | "
            f"{verdict} | "
            f"{pm(paired, 4)} ({len(paired)} seed{'' if len(paired) == 1 else 's'}) |"
        )
    if lines:
        print(
            "\n| target ε | distributed | mean loss − central's | central's sd | one sd? | "
            "difference per seed |\n|---|---|---|---|---|---|"
        )
        print("\n".join(lines))


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "client-dp",
        sys.argv[2] if len(sys.argv) > 2 else None,
    )
