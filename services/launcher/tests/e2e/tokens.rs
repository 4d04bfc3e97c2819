//! Tokens and the authority they carry: revocation fails closed (a replica
//! that cannot load the revoked-token list refuses what it cannot judge and
//! is not ready); a stream ends with the token it was opened with (expiry,
//! logout) and resumes with a fresh one.

use crate::helpers::*;
use crate::push::{
    Replica, expect_orders, gateway_stream, h2_client, next, order_of, settled_order, stream_with_one_event,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Token checks that refresh the revoked list every 100 ms and hold it good
/// for one second.
fn strict() -> runtime::auth::tokens::VerifierConfig {
    runtime::auth::tokens::VerifierConfig {
        revocation_refresh_ms: 100,
        revocation_max_age_secs: 1,
        ..Default::default()
    }
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
    let proxy = TcpProxy::before(&app.identity).await;
    let proxied = proxy.url(&app.identity);
    let gateway = app
        .gateway_with(|c| {
            c.identity_url = proxied;
            c.verifier = strict();
        })
        .await;
    let account = format!("{gateway}/api/v1/billing/account");
    let ready = format!("{gateway}/health/ready");
    let r = app.http.get(&account).bearer_auth(&alice.token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Identity is out of its reach; meanwhile alice logs out (through the
    // first gateway, so identity records it).
    proxy.set(Link::Cut);
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
    proxy.set(Link::Open);
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
    let proxy = TcpProxy::before(&app.identity).await;
    let replica = Replica::start(&app, |c| {
        c.identity_url = Some(proxy.url(&app.identity));
        c.verifier = strict();
    })
    .await;
    // Its HTTPS port faces browsers: it checks their tokens itself.
    let http = h2_client();
    let (orders, ready) = (format!("{}/api/v1/orders", replica.https), format!("{}/health/ready", replica.url));
    let resp = eventually(WAIT, || async {
        let r = http.get(&orders).bearer_auth(&alice.token).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await;
    drop(resp);
    assert_eq!(status_of(&http, &ready).await, StatusCode::OK);

    proxy.set(Link::Cut);
    eventually(WAIT, || async { (status_of(&http, &ready).await == StatusCode::SERVICE_UNAVAILABLE).then_some(()) })
        .await;
    assert_unjudgeable(http.get(&orders).bearer_auth(&alice.token).send().await.unwrap()).await;

    proxy.set(Link::Open);
    eventually(WAIT, || async { (status_of(&http, &ready).await == StatusCode::OK).then_some(()) }).await;
    let r = http.get(&orders).bearer_auth(&alice.token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    replica.stop().await;
    app.stop().await;
}

/// Waits until the stream ends (the server closed it).
async fn ended(stream: &mut tokio::sync::mpsc::UnboundedReceiver<SseEvent>, within: Duration) {
    tokio::time::timeout(within, async { while stream.recv().await.is_some() {} })
        .await
        .expect("the stream ended in time");
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires_and_resumes_with_a_fresh_one() {
    const TTL: u64 = 4;
    let app = TestApp::spawn_with(|c| c.token_ttl_secs = TTL).await;
    let logged_in = tokio::time::Instant::now();
    let user = app.user().await;
    let (mut stream, seen, _) = stream_with_one_event(&app, &user, 10).await; // fails: no money

    // It ends by itself once the token has expired (5 s of leeway after exp).
    ended(&mut stream, Duration::from_secs(TTL + 15)).await;
    assert!(logged_in.elapsed() >= Duration::from_secs(TTL), "ended after {:?}", logged_in.elapsed());
    let r = app.call(Some(&user), reqwest::Method::GET, "/billing/account", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "the old token is no longer accepted");

    // A fresh token resumes from the last id: nothing missed.
    let user = app.login_again(&user).await;
    let missed = settled_order(&app, &user, 11).await;
    let mut stream = gateway_stream(&app, &user, Some(seen.id())).await;
    expect_orders(&mut stream, &[&missed], seen.id()).await;
    app.stop().await;
}

#[tokio::test]
async fn a_stream_opened_with_an_assertion_ends_when_the_token_it_names_expires() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let replica = Replica::start(&app, |_| {}).await;
    // On the push service's internal port, as the gateway would open it for
    // a token that expires in a second.
    let expires = chrono::Utc::now().timestamp() + 1;
    let caller = runtime::auth::CurrentUser { token_expires: expires, ..as_current(&user) };
    let assertion = app.signer().sign("push", &reqwest::Method::GET, "/api/v1/orders", &caller);
    let resp =
        reqwest::Client::new().get(format!("{}/api/v1/orders", replica.url)).header(ASSERTION, assertion).send().await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = sse_events(resp);
    // It ends by itself once the token would no longer be accepted (its
    // expiry and the gateway's leeway), heartbeats notwithstanding.
    ended(&mut stream, WAIT).await;
    assert!(chrono::Utc::now().timestamp() > expires, "ended before the token expired");
    replica.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_stream_ends_when_its_token_is_logged_out_at_the_gateway_and_at_a_push_replica() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    // A replica facing browsers, which checks tokens itself.
    let replica = Replica::start(&app, |_| {}).await;
    let direct =
        |token: &str| h2_client().get(format!("{}/api/v1/orders", replica.https)).bearer_auth(token.to_string()).send();
    let mut through_gateway = gateway_stream(&app, &user, None).await;
    let resp = eventually(WAIT, || async {
        let r = direct(&user.token).await.ok()?;
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await;
    let mut at_replica = sse_events(resp);
    let first = settled_order(&app, &user, 10).await;
    let seen = next(&mut through_gateway).await;
    assert_eq!(order_of(&seen), first);
    assert_eq!(order_of(&next(&mut at_replica).await), first);

    let r = app.post(&user, "/identity/logout", json!({})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    ended(&mut through_gateway, Duration::from_secs(5)).await;
    ended(&mut at_replica, Duration::from_secs(5)).await;

    let user = app.login_again(&user).await;
    let missed = settled_order(&app, &user, 11).await;
    let mut stream = gateway_stream(&app, &user, Some(seen.id())).await;
    expect_orders(&mut stream, &[&missed], seen.id()).await;
    // The replica opens a stream for the fresh token too (sse_events checks the 200).
    drop(sse_events(direct(&user.token).await.unwrap()));
    replica.stop().await;
    app.stop().await;
}

/// The `kid` a token's header names.
fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["kid"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_key_rotation_keeps_old_tokens_valid_and_signs_new_ones_with_the_new_key() {
    let app = TestApp::spawn().await;
    let alice = app.user().await;
    let old_kid = kid_of(&alice.token);
    // A push replica facing browsers, which verifies tokens itself.
    let replica = Replica::start(&app, |_| {}).await;
    let orders = format!("{}/api/v1/orders", replica.https);
    let stream_status = |token: String| {
        let orders = orders.clone();
        async move {
            let r = h2_client().get(orders).bearer_auth(token).send().await.unwrap();
            r.status()
        }
    };
    eventually(WAIT, || async { (stream_status(alice.token.clone()).await == StatusCode::OK).then_some(()) }).await;

    // `order-system rotate-key` does this.
    let new_kid = identity::rotate_signing_key(&format!("{}/{}_identity", postgres_url(), app.prefix)).await.unwrap();
    assert_ne!(new_kid, old_kid);
    // Identity picks it up (SIGNING_KEY_RELOAD_SECS, 1 s here) and publishes
    // it first; then a new login gets the new key. (Waiting on the key set,
    // not on logins: those are throttled per account.)
    let jwks: Value = eventually(WAIT, || async {
        let url = format!("{}/.well-known/jwks.json", app.identity);
        let jwks: Value = app.http.get(url).send().await.ok()?.json().await.ok()?;
        (jwks["keys"][0]["kid"] == new_kid.as_str()).then_some(jwks)
    })
    .await;
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, [new_kid.as_str(), old_kid.as_str()], "current first, then the previous one");
    let bob = app.user().await;
    let bob = app.login_again(&bob).await;
    assert_eq!(kid_of(&bob.token), new_kid, "a login after the reload is signed with the new key");

    // Both tokens verify at the gateway and at the push replica, which learn
    // the new key on its first token (or, when they looked less than a
    // second ago, answer 503 + Retry-After until they may look again).
    for user in [&bob, &alice] {
        let at_gateway = eventually(WAIT, || async {
            let r = app.call(Some(user), reqwest::Method::GET, "/billing/account", None).await;
            (r.status() != StatusCode::SERVICE_UNAVAILABLE).then_some(r.status())
        })
        .await;
        assert_eq!(at_gateway, StatusCode::OK, "at the gateway, kid {}", kid_of(&user.token));
        let at_push = eventually(WAIT, || async {
            let status = stream_status(user.token.clone()).await;
            (status != StatusCode::SERVICE_UNAVAILABLE).then_some(status)
        })
        .await;
        assert_eq!(at_push, StatusCode::OK, "at push, kid {}", kid_of(&user.token));
    }
    replica.stop().await;
    app.stop().await;
}
