//! Enrollment end to end over QUIC: a device makes its key, trades a one-time token for a
//! certificate, takes part in a round with it, renews it over mTLS, and is revoked by id so
//! that its renewed certificate is refused too. A used, expired or unknown token, and a
//! request whose signature does not match its key, are refused with typed errors and issue
//! nothing.

use std::net::SocketAddr;
use std::time::Duration;

use burn::tensor::Device;
use fedlora_client::enroll::{cert_not_after, csr, device_key, enroll, exchange, EnrollOptions};
use fedlora_client::sdk::{ClientConfig, FederatedClient};
use fedlora_client::transport::{endpoint, ClientTls, Session};
use fedlora_client::ClientError;
use fedlora_coordinator::certs::{
    default_server_names, fingerprint, init_certs, revoke, revoke_device, revoke_key, CertDir,
};
use fedlora_coordinator::enroll::tokens::{issue_tokens, TOKEN_FILE};
use fedlora_coordinator::enroll::{EnrollConfig, Enrollment, Presented};
use fedlora_coordinator::store::Store;
use fedlora_coordinator::{Coordinator, CoordinatorConfig};
use fedlora_protocol::enroll::{EnrollErrorCode, EnrollRequest, EnrollResponse};
use fedlora_protocol::{ClientMsg, CoordMsg, RefusalCode, PROTOCOL_VERSION};
use fedlora_train::adapter::{collect_named, NamedFilter};
use fedlora_train::data::ClientData;
use fedlora_train::lora::LoraConfig;
use fedlora_train::model::LmConfig;
use fedlora_train::train::{initial_adapter, LocalTrainer};

use crate::common;

fn tiny(lora: Option<LoraConfig>) -> LmConfig {
    common::tiny_lm(32, 1, lora)
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A hello with `tls` on the main endpoint: `Ok` when welcomed, else the refusal's code.
async fn hello(addr: SocketAddr, tls: &ClientTls, spec_hash: [u8; 32]) -> Result<(), RefusalCode> {
    let ep = endpoint(tls).unwrap();
    let s = Session::connect(&ep, addr, "localhost").await.unwrap();
    let msg = ClientMsg::Hello {
        protocol_version: PROTOCOL_VERSION,
        spec_hash,
        max_rank: None,
    };
    let r = match s.request(&msg).await.unwrap().0 {
        CoordMsg::Welcome { .. } => Ok(()),
        CoordMsg::Refused(r) => Err(r.code),
        other => panic!("unexpected answer to a hello: {other:?}"),
    };
    s.close();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_enroll_with_one_time_tokens_renew_and_are_revoked_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names())
        .unwrap()
        .0;
    let file = certs.join(TOKEN_FILE);
    let good = issue_tokens(&file, 2, 3600, now_s()).unwrap();
    let expired = issue_tokens(&file, 1, 0, now_s()).unwrap();

    let cfg_lm = tiny(Some(LoraConfig::new().with_rank(4)));
    let device = Device::flex().autodiff();
    let base = collect_named(&tiny(None).init(&device), NamedFilter::All);
    let trainer = LocalTrainer::new(cfg_lm.clone(), &base, device).unwrap();
    let spec_hash = trainer.spec().hash();

    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let mut ec = EnrollConfig::from_certs_dir(&certs, "127.0.0.1:0".parse().unwrap());
    // short-lived certificates, so that the device renews at its first hello
    ec.validity_s = 600;
    cfg.enroll = Some(ec);
    cfg.federation = common::federation(1, 1, 1, 2, 120);
    cfg.federation.train.batch_size = 4;
    let coord = Coordinator::start(cfg, initial_adapter(&cfg_lm).unwrap())
        .await
        .unwrap();
    let (addr, enroll_addr) = (coord.local_addr().unwrap(), coord.enroll_addr().unwrap());
    let opts = |name: &str, token: &str| EnrollOptions {
        endpoint: enroll_addr,
        server_name: "localhost".into(),
        ca: CertDir(certs.clone()).ca(),
        token: token.into(),
        state_dir: dir.path().join(name),
    };
    let code = |r: Result<_, ClientError>| match r {
        Err(ClientError::Enroll(code, _)) => code,
        Ok(_) => panic!("issued"),
        Err(e) => panic!("{e}"),
    };

    // the device makes its key (mode 0600) and gets a certificate for it
    let a = enroll(&opts("a", &good[0])).await.unwrap();
    assert!(a.device_id.starts_with("device-"));
    assert!(a.not_after_unix_s > now_s());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&a.tls.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // a token works once; an expired or unknown one never: nothing is issued
    assert_eq!(
        code(enroll(&opts("b", &good[0])).await),
        EnrollErrorCode::TokenUsed
    );
    assert_eq!(
        code(enroll(&opts("b", &expired[0])).await),
        EnrollErrorCode::TokenExpired
    );
    assert_eq!(
        code(enroll(&opts("b", "fl-not-a-token")).await),
        EnrollErrorCode::UnknownToken
    );
    assert!(!ClientTls::from_state_dir(&dir.path().join("b"))
        .cert
        .exists());
    // a request whose signature does not match its key is refused, and its token is not used
    let key = device_key(&dir.path().join("c/device.key")).unwrap();
    let mut tampered = csr(&key).unwrap();
    let n = tampered.len();
    tampered[n - 5] ^= 0x40;
    let bad = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        token: good[1].clone(),
        csr_der: tampered,
    };
    match exchange(&opts("c", &good[1]), &bad).await.unwrap() {
        EnrollResponse::Refused { code, .. } => assert_eq!(code, EnrollErrorCode::BadRequest),
        other => panic!("{other:?}"),
    }
    let c = enroll(&opts("c", &good[1])).await.unwrap();
    assert_ne!(c.device_id, a.device_id);

    // the enrolled device takes part in a round; its certificate ends within the renewal
    // window, so it renews first, over mTLS, for the same key
    let first_cert = std::fs::read(&a.tls.cert).unwrap();
    let mut cc = ClientConfig::new(addr, a.tls.clone());
    cc.state_dir = Some(dir.path().join("a"));
    cc.sampling_seed = Some(1);
    cc.renew_within_s = Some(3600);
    let data = ClientData::demo_client(0, 16).unwrap();
    let client = FederatedClient::new(cc, trainer.clone(), data).unwrap();
    let run = tokio::spawn(async move { client.run().await });
    assert!(tokio::time::timeout(
        Duration::from_secs(120),
        coord.wait_finished(Duration::from_millis(200))
    )
    .await
    .unwrap());
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.rounds, vec![1]);
    assert_eq!(report.renewals, 1, "{report:?}");
    assert_eq!(report.client_id, a.device_id);
    assert_ne!(std::fs::read(&a.tls.cert).unwrap(), first_cert);
    assert!(cert_not_after(&a.tls.cert).unwrap() >= a.not_after_unix_s);

    // status lists both devices with their expiry, and the renewal
    let status = coord.report().unwrap();
    assert_eq!(status.devices.len(), 2);
    let rec = status
        .devices
        .iter()
        .find(|d| d.device_id == a.device_id)
        .unwrap();
    assert_eq!(rec.renewals, 1);
    assert!(rec.not_after_unix_s > now_s());

    // revoked by id: the renewed certificate and the first one are both refused
    assert_eq!(hello(addr, &a.tls, spec_hash).await, Ok(()));
    revoke_device(&CertDir(certs.clone()), &a.device_id).unwrap();
    assert_eq!(
        hello(addr, &a.tls, spec_hash).await,
        Err(RefusalCode::Revoked)
    );
    let old = dir.path().join("a/first.pem");
    std::fs::write(&old, &first_cert).unwrap();
    let old_tls = ClientTls {
        cert: old,
        ..a.tls.clone()
    };
    assert_eq!(
        hello(addr, &old_tls, spec_hash).await,
        Err(RefusalCode::Revoked)
    );
    // the other device is unaffected
    assert_eq!(hello(addr, &c.tls, spec_hash).await, Ok(()));
    coord.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_enrollment_service_signs_with_its_own_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names())
        .unwrap()
        .0;
    let (dev, store) = common::enroll_through_intermediate(dir.path(), &certs).await;
    assert_eq!(store.registry().unwrap().devices().unwrap().len(), 1);
    // the chain (device, intermediate) verifies at the coordinator, which trusts the root only
    let cfg_lm = tiny(Some(LoraConfig::new().with_rank(4)));
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let initial = initial_adapter(&cfg_lm).unwrap();
    let spec_hash = initial.spec().hash();
    let coord = Coordinator::start(cfg, initial).await.unwrap();
    assert_eq!(
        hello(coord.local_addr().unwrap(), &dev.tls, spec_hash).await,
        Ok(())
    );
    coord.shutdown().await;
}

/// A welcomed session with `tls`, kept open.
async fn session(addr: SocketAddr, tls: &ClientTls, spec_hash: [u8; 32]) -> Session {
    let ep = endpoint(tls).unwrap();
    let s = Session::connect(&ep, addr, "localhost").await.unwrap();
    let msg = ClientMsg::Hello {
        protocol_version: PROTOCOL_VERSION,
        spec_hash,
        max_rank: None,
    };
    match s.request(&msg).await.unwrap().0 {
        CoordMsg::Welcome { .. } => s,
        other => panic!("not welcomed: {other:?}"),
    }
}

/// The QUIC close code of `s`'s connection once the coordinator closes it (within 5 s).
async fn closed_with(s: &Session) -> Option<u64> {
    match tokio::time::timeout(Duration::from_secs(5), s.connection().closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => None,
    }
}

/// What the connection of a certificate file presents to renewal.
fn presented(cert: &std::path::Path, device_id: &str) -> Presented {
    let der = fedlora_coordinator::certs::read_cert_der(cert).unwrap();
    let (key_id, _, not_after) =
        fedlora_coordinator::enroll::issuer::cert_key_and_name(&der).unwrap();
    Presented {
        device_id: device_id.into(),
        fingerprint: fingerprint(&der),
        key_id,
        not_after_unix_s: not_after,
    }
}

/// Revocation by certificate (`certs revoke --client-index`), by key and by device id closes
/// the identity's live connections at once, and a revoked certificate cannot renew itself back:
/// renewal checks the presented certificate against the deny-list, opens only inside its window
/// before expiry, and is for enrolled devices only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_live_connections_and_renewal_respects_it_and_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 2, &default_server_names())
        .unwrap()
        .0;
    let cd = CertDir(certs.clone());
    let tokens = issue_tokens(&certs.join(TOKEN_FILE), 3, 3600, now_s()).unwrap();
    let cfg_lm = tiny(Some(LoraConfig::new().with_rank(4)));
    let initial = initial_adapter(&cfg_lm).unwrap();
    let spec_hash = initial.spec().hash();
    let mut cfg = CoordinatorConfig::new(dir.path().join("state"), &certs);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let mut ec = EnrollConfig::from_certs_dir(&certs, "127.0.0.1:0".parse().unwrap());
    ec.validity_s = 600;
    cfg.enroll = Some(ec.clone());
    let coord = Coordinator::start(cfg, initial).await.unwrap();
    let (addr, enroll_addr) = (coord.local_addr().unwrap(), coord.enroll_addr().unwrap());
    let mut devices = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let opts = EnrollOptions {
            endpoint: enroll_addr,
            server_name: "localhost".into(),
            ca: cd.ca(),
            token: t.clone(),
            state_dir: dir.path().join(format!("d{i}")),
        };
        devices.push(enroll(&opts).await.unwrap());
    }

    // live sessions: client-0 (certs init), and three enrolled devices
    let c0 = ClientTls::from_dir(&certs, 0);
    let s0 = session(addr, &c0, spec_hash).await;
    let s1 = session(addr, &ClientTls::from_dir(&certs, 1), spec_hash).await;
    let live: Vec<Session> = sessions_of(&devices, addr, spec_hash).await;
    // by certificate (what `certs revoke --client-index 0` writes): client-0's connection ends
    revoke(&cd, &c0.cert).unwrap();
    assert_eq!(closed_with(&s0).await, Some(4), "revoked by certificate");
    // by key and by device id: those devices' connections end
    revoke_key(&cd, &devices[0].tls.cert).unwrap();
    assert_eq!(closed_with(&live[0]).await, Some(4), "revoked by key");
    revoke_device(&cd, &devices[1].device_id).unwrap();
    assert_eq!(closed_with(&live[1]).await, Some(4), "revoked by device id");
    // the others stay connected and served
    for s in [&s1, &live[2]] {
        let (poll, _) = s
            .request(&ClientMsg::Poll { held_version: None })
            .await
            .unwrap();
        assert!(!matches!(poll, CoordMsg::Refused(_)), "{poll:?}");
    }

    // renewal, with the enrollment's own checks (the coordinator's store is held by it, so a
    // second registry over a copy of the certificate directory's deny-list)
    coord.shutdown().await;
    let store = Store::open(&dir.path().join("renew-state")).unwrap();
    let e = Enrollment::new(ec.clone(), store.registry().unwrap()).unwrap();
    let fresh_csr = |i: usize| {
        let key = device_key(&dir.path().join(format!("d{i}/new.key"))).unwrap();
        csr(&key).unwrap()
    };
    let now = now_s();
    // revoked by key or by id: the presented certificate cannot renew into a new key
    for (i, d) in devices.iter().enumerate().take(2) {
        let p = presented(&d.tls.cert, &d.device_id);
        let r = e.renew(&p, &fresh_csr(i), now);
        assert_eq!(r.unwrap_err().0, EnrollErrorCode::Revoked, "device {i}");
    }
    // revoked by certificate fingerprint alone (a device's certificate file)
    revoke(&cd, &devices[2].tls.cert).unwrap();
    let p2 = presented(&devices[2].tls.cert, &devices[2].device_id);
    assert_eq!(
        e.renew(&p2, &fresh_csr(2), now).unwrap_err().0,
        EnrollErrorCode::Revoked
    );
    // a `certs init` client never renews through enrollment
    let p1 = presented(&cd.client_cert(1), "client-1");
    let (c, m) = e.renew(&p1, &fresh_csr(1), now).unwrap_err();
    assert_eq!(c, EnrollErrorCode::BadRequest, "{m}");

    // the window: an unrevoked device renews only within renew_window_s of its expiry
    let mut narrow = ec.clone();
    narrow.renew_window_s = 60;
    let store2 = Store::open(&dir.path().join("renew-state-2")).unwrap();
    let e2 = Enrollment::new(narrow, store2.registry().unwrap()).unwrap();
    // (device 2's certificate is revoked by fingerprint; as if it were another, unrevoked one)
    let mut ok = p2.clone();
    ok.fingerprint = "not-revoked".into();
    let own_csr = csr(&device_key(&devices[2].tls.key).unwrap()).unwrap();
    let early = e2.renew(&ok, &own_csr, ok.not_after_unix_s - 600);
    let (c, m) = early.unwrap_err();
    assert_eq!(c, EnrollErrorCode::BadRequest);
    assert!(m.contains("renewal opens"), "{m}");
    // inside the window: another key is refused (a renewal keeps the key), the own key renews,
    // and an expired certificate cannot renew
    let (c, m) = e2
        .renew(&ok, &fresh_csr(2), ok.not_after_unix_s - 30)
        .unwrap_err();
    assert_eq!(c, EnrollErrorCode::BadRequest);
    assert!(m.contains("keeps the certificate's key"), "{m}");
    e2.renew(&ok, &own_csr, ok.not_after_unix_s - 30).unwrap();
    let (c, _) = e2
        .renew(&ok, &own_csr, ok.not_after_unix_s + 1)
        .unwrap_err();
    assert_eq!(c, EnrollErrorCode::BadRequest);
}

/// One welcomed session per enrolled device.
async fn sessions_of(
    devices: &[fedlora_client::enroll::Enrolled],
    addr: SocketAddr,
    spec_hash: [u8; 32],
) -> Vec<Session> {
    let mut out = Vec::new();
    for d in devices {
        out.push(session(addr, &d.tls, spec_hash).await);
    }
    out
}

/// The unauthenticated enrollment endpoint bounds what strangers can hold: connections past
/// its cap are refused before their handshake, and a connection that sends nothing is closed
/// after the connection timeout, freeing its slot for a real device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrollment_endpoint_caps_connections_and_closes_silent_ones() {
    use fedlora_coordinator::enroll::EnrollService;
    let dir = tempfile::tempdir().unwrap();
    let certs = init_certs(&dir.path().join("certs"), 1, &default_server_names())
        .unwrap()
        .0;
    let token = issue_tokens(&certs.join(TOKEN_FILE), 1, 3600, now_s()).unwrap();
    let mut ec = EnrollConfig::from_certs_dir(&certs, "127.0.0.1:0".parse().unwrap());
    ec.max_connections = 2;
    ec.connection_timeout_ms = 800;
    let store = Store::open(&dir.path().join("enroll-state")).unwrap();
    let service = EnrollService::start(std::sync::Arc::new(
        Enrollment::new(ec, store.registry().unwrap()).unwrap(),
    ))
    .unwrap();
    let addr = service.local_addr().unwrap();
    let ca = CertDir(certs.clone()).ca();
    let client_ep = || {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(fedlora_client::transport::enroll_client_config(&ca).unwrap());
        ep
    };
    // two silent strangers: handshake, a stream opened, nothing sent
    let mut silent = Vec::new();
    for _ in 0..2 {
        let ep = client_ep();
        let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0]).await.unwrap();
        silent.push((ep, conn, send));
    }
    // a third is refused at once
    let ep = client_ep();
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect(addr, "localhost").unwrap(),
    )
    .await
    .expect("answered at once");
    assert!(
        matches!(third, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{third:?}"
    );
    // the silent ones are closed by the timeout, and a device enrolls
    for (_, conn, _) in &silent {
        let why = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("closed by the connection timeout");
        assert!(
            matches!(why, quinn::ConnectionError::ApplicationClosed(_)),
            "{why}"
        );
    }
    let device = enroll(&EnrollOptions {
        endpoint: addr,
        server_name: "localhost".into(),
        ca: ca.clone(),
        token: token[0].clone(),
        state_dir: dir.path().join("dev"),
    })
    .await
    .unwrap();
    assert!(device.device_id.starts_with("device-"));
    service.shutdown();
}
