//! Tokens and the authority they carry: revocation fails closed (a replica
//! that cannot load the revoked-token list refuses what it cannot judge and
//! is not ready).

use crate::helpers::*;
use crate::push::Replica;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Token checks that refresh the revoked list every 100 ms and hold it good
/// for one second.
fn strict() -> runtime::tokens::VerifierConfig {
    runtime::tokens::VerifierConfig { revocation_refresh_ms: 100, revocation_max_age_secs: 1, ..Default::default() }
}

async fn status_of(http: &reqwest::Client, url: &str) -> StatusCode {
    http.get(url).send().await.unwrap().status()
}

async fn assert_unjudgeable(resp: reqwest::Response) {
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().expect("Retry-After in seconds");
    assert!(retry >= 1);
    assert_error(resp, StatusCode::SERVICE_UNAVAILABLE, "revoked tokens").await;
}

#[tokio::test]
async fn a_gateway_that_cannot_load_revocations_refuses_tokens_and_is_not_ready() {
    let mut app = TestApp::spawn().await;
    let alice = app.user().await;
    let bob = app.user().await;
    // A second gateway that reaches identity through a proxy the test cuts.
    let proxy = CuttableProxy::start(&app.identity).await;
    let gateway = app
        .gateway_with(|c| {
            c.identity_url = proxy.url.clone();
            c.verifier = strict();
        })
        .await;
    let account = format!("{gateway}/api/v1/billing/account");
    let ready = format!("{gateway}/health/ready");
    let r = app.http.get(&account).bearer_auth(&alice.token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Identity is out of its reach; meanwhile alice logs out (through the
    // first gateway, so identity records it).
    proxy.cut();
    let r = app.post(&alice, "/identity/logout", json!({})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    eventually(WAIT, || async {
        (status_of(&app.http, &ready).await == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let body: Value = app.http.get(&ready).send().await.unwrap().json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("revoked tokens"), "{body}");
    // Neither the logged-out token nor a good one is accepted: neither can be judged.
    for token in [&alice.token, &bob.token] {
        assert_unjudgeable(app.http.get(&account).bearer_auth(token).send().await.unwrap()).await;
    }
    // A token that is no token at all is still a 401.
    let r = app.http.get(&account).bearer_auth("x.y.z").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Back in reach: ready again, the logged-out token refused, the other accepted.
    proxy.restore();
    eventually(WAIT, || async { (status_of(&app.http, &ready).await == StatusCode::OK).then_some(()) }).await;
    let r = app.http.get(&account).bearer_auth(&alice.token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app.http.get(&account).bearer_auth(&bob.token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_push_replica_that_cannot_load_revocations_refuses_streams_and_is_not_ready() {
    let app = TestApp::spawn().await;
    let alice = app.user().await;
    let proxy = CuttableProxy::start(&app.identity).await;
    let replica = Replica::start(&app, |c| {
        c.identity_url = Some(proxy.url.clone());
        c.verifier = strict();
    })
    .await;
    let http = reqwest::Client::new();
    let (orders, ready) = (format!("{}/api/v1/orders", replica.url), format!("{}/health/ready", replica.url));
    let resp = eventually(WAIT, || async {
        let r = http.get(&orders).bearer_auth(&alice.token).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await;
    drop(resp);
    assert_eq!(status_of(&http, &ready).await, StatusCode::OK);

    proxy.cut();
    eventually(WAIT, || async { (status_of(&http, &ready).await == StatusCode::SERVICE_UNAVAILABLE).then_some(()) })
        .await;
    assert_unjudgeable(http.get(&orders).bearer_auth(&alice.token).send().await.unwrap()).await;

    proxy.restore();
    eventually(WAIT, || async { (status_of(&http, &ready).await == StatusCode::OK).then_some(()) }).await;
    let r = http.get(&orders).bearer_auth(&alice.token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    replica.stop().await;
    app.stop().await;
}
