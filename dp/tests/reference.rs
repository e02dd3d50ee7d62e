//! The RDP accountant against Google's dp-accounting (reference values generated once by
//! `tests/data/gen_reference.py` and committed), and its soundness against tighter analyses.

use fedlora_dp::analytic::gaussian_epsilon;
use fedlora_dp::dp_sgd_epsilon;
use serde_json::Value;

fn rows() -> Vec<Value> {
    let v: Value = serde_json::from_str(include_str!("data/rdp_reference.json")).unwrap();
    v["rows"].as_array().unwrap().clone()
}

fn mine(r: &Value) -> f64 {
    dp_sgd_epsilon(
        r["q"].as_f64().unwrap(),
        r["sigma"].as_f64().unwrap(),
        r["steps"].as_u64().unwrap(),
        r["delta"].as_f64().unwrap(),
    )
    .unwrap()
    .0
}

#[test]
fn matches_dp_accounting_rdp_within_one_percent_where_epsilon_is_at_most_10() {
    let mut checked = 0;
    for r in rows() {
        let Some(reference) = r["rdp_epsilon"].as_f64() else {
            continue;
        };
        if reference > 10.0 {
            continue;
        }
        let got = mine(&r);
        let rel = (got - reference).abs() / reference.max(1e-12);
        assert!(
            rel <= 0.01 || (got - reference).abs() < 1e-9,
            "q={} σ={} T={}: ours {got}, dp-accounting {reference}",
            r["q"],
            r["sigma"],
            r["steps"]
        );
        checked += 1;
    }
    assert!(checked > 100, "only {checked} reference points");
}

#[test]
fn never_below_the_exact_gaussian_at_q_1() {
    for r in rows().iter().filter(|r| r["q"].as_f64() == Some(1.0)) {
        let exact = gaussian_epsilon(
            r["sigma"].as_f64().unwrap(),
            r["steps"].as_u64().unwrap(),
            r["delta"].as_f64().unwrap(),
        )
        .unwrap();
        let got = mine(r);
        assert!(
            got >= exact,
            "σ={} T={}: ours {got} < exact {exact}",
            r["sigma"],
            r["steps"]
        );
    }
}

#[test]
fn never_below_dp_accountings_optimistic_pld() {
    let mut checked = 0;
    for r in rows() {
        let Some(lower) = r["pld_optimistic_epsilon"].as_f64() else {
            continue;
        };
        // the optimistic PLD is a lower bound on the true ε: an accountant below it
        // under-reports
        let got = mine(&r);
        assert!(
            got >= lower,
            "q={} σ={} T={}: ours {got} < optimistic PLD {lower}",
            r["q"],
            r["sigma"],
            r["steps"]
        );
        checked += 1;
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn pld_is_between_dp_accountings_optimistic_and_pessimistic_pld() {
    let mut checked = 0;
    for r in rows() {
        let (Some(lower), Some(upper)) = (
            r["pld_optimistic_epsilon"].as_f64(),
            r["pld_epsilon"].as_f64(),
        ) else {
            continue;
        };
        let steps = r["steps"].as_u64().unwrap();
        let sigma = r["sigma"].as_f64().unwrap();
        if steps > 100 || sigma < 0.7 {
            continue; // keep the test fast; the calibration tests cover longer runs
        }
        let q = r["q"].as_f64().unwrap();
        let got =
            fedlora_dp::pld::dp_sgd_epsilon(q, sigma, steps, r["delta"].as_f64().unwrap()).unwrap();
        // sound: not below the optimistic PLD (a lower bound on the true ε)
        assert!(
            got >= lower - 1e-9,
            "q={q} σ={sigma} T={steps}: {got} < {lower}"
        );
        // tight: above dp-accounting's pessimistic PLD (which discretises more cleverly,
        // "connect the dots") by at most what rounding each step's loss up by h = 1e-4 can add
        let slack = steps as f64 * fedlora_dp::pld::DEFAULT_INTERVAL;
        assert!(
            got <= upper + slack,
            "q={q} σ={sigma} T={steps}: {got} > {upper} + {slack}"
        );
        // and not above RDP (up to the same discretisation slack)
        assert!(got <= mine(&r) + slack, "PLD {got} above RDP {}", mine(&r));
        checked += 1;
    }
    assert!(checked > 40, "{checked}");
}

#[test]
fn pld_needs_noticeably_less_noise_than_rdp_at_epsilon_1() {
    // the demo's DP setting: q = 16/500, 30 steps × 3 rounds, δ = 1e-5, ε = 1
    let q = 16.0 / 500.0;
    let rdp = fedlora_dp::noise_multiplier(q, 90, 1e-5, 1.0).unwrap();
    let pld = fedlora_dp::pld::noise_multiplier(q, 90, 1e-5, 1.0).unwrap();
    assert!(pld < 0.95 * rdp, "PLD σ {pld} vs RDP σ {rdp}");
    assert!(fedlora_dp::pld::dp_sgd_epsilon(q, pld, 90, 1e-5).unwrap() <= 1.0);
}
