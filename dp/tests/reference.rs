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
