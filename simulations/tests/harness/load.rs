//! A round of a few hundred synthetic SDK clients over real QUIC + mutual TLS commits exactly
//! the aggregate of what they sent: bit for bit under secure aggregation (modular codec), within
//! 1e-6 of the f64 reference sum with dense f32. The big runs are `fedlora bench load`.

use fedlora_simulations::load::{run_in_process, LoadConfig};

#[test]
fn a_secure_round_of_200_quic_clients_commits_the_exact_sum() {
    let r = run_in_process(&LoadConfig {
        clients: 200,
        params: 2_048,
        secure: true,
        seed: 3,
        round_timeout_ms: 120_000,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(r.counted, 200, "{r:?}");
    assert!(r.exact, "{r:?}");
    assert!(r.p50_upload_ms > 0.0, "{r:?}");
}

#[test]
fn a_plain_round_of_300_quic_clients_commits_the_exact_mean() {
    let r = run_in_process(&LoadConfig {
        clients: 300,
        params: 4_096,
        seed: 4,
        round_timeout_ms: 120_000,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(r.counted, 300, "{r:?}");
    assert!(r.exact, "{r:?}");
}

#[test]
fn the_exactness_check_fails_when_one_upload_is_left_out() {
    // the reference of 4 clients is not the committed global of 5: `exact` can fail
    use fedlora_protocol::FlatAdapter;
    use fedlora_simulations::load::{expected_global, matches};
    for secure in [false, true] {
        let cfg = LoadConfig {
            clients: 5,
            params: 512,
            secure,
            ..Default::default()
        };
        let zero = FlatAdapter::zeros(cfg.spec().unwrap());
        let all = expected_global(&cfg, &zero, 1, &[0, 1, 2, 3, 4]).unwrap();
        let fewer = expected_global(&cfg, &zero, 1, &[0, 1, 2, 3]).unwrap();
        assert!(matches(&cfg, &all, &all));
        assert!(!matches(&cfg, &all, &fewer), "secure {secure}");
    }
}
