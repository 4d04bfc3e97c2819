//! Abuse: login storms, guessing from one address, registration floods and
//! more password checks than the machine can run at once. Each is answered
//! 429 or 503 with `Retry-After` and the error body, never with a 500, while
//! other users go on.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A login through the gateway as if from `address` (set by the ingress in
/// front of the gateway, whose header the gateway is configured to trust).
async fn login_from(app: &TestApp, address: &str, email: &str, password: &str) -> reqwest::Response {
    app.http
        .post(app.url("/identity/login"))
        .header("x-real-ip", address)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("gateway answers")
}

async fn assert_throttled(resp: reqwest::Response, status: StatusCode, needle: &str) {
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().expect("Retry-After in seconds");
    assert!(retry >= 1, "Retry-After {retry}");
    assert_error(resp, status, needle).await;
}

fn behind_ingress(tuning: Tuning) -> Tuning {
    Tuning { gateway_client_ip_header: Some("x-real-ip".into()), ..tuning }
}

#[tokio::test]
async fn a_login_storm_on_one_account_is_throttled_while_another_user_logs_in() {
    let app = TestApp::spawn_with(behind_ingress(Tuning::default())).await;
    let victim = app.user().await;
    let other = app.user().await;

    // 200 wrong passwords at once, each from another address (a botnet):
    // only the account's own limit can stop them.
    let storm = (0..200).map(|i| {
        let (app, email) = (&app, &victim.email);
        async move { login_from(app, &format!("10.0.{}.{}", i / 250, i % 250 + 1), email, "wrong password").await }
    });
    let legit = async {
        // The other user logs in during the storm.
        let r = login_from(&app, "192.0.2.50", &other.email, "correct horse").await;
        (r.status(), r.json::<Value>().await.ok())
    };
    let (answers, (other_status, other_body)) = tokio::join!(futures::future::join_all(storm), legit);

    assert_eq!(other_status, StatusCode::OK, "{other_body:?}");
    assert!(other_body.unwrap()["accessToken"].is_string());
    let mut unauthorized = 0;
    let mut throttled = None;
    for r in answers {
        match r.status() {
            StatusCode::UNAUTHORIZED => unauthorized += 1,
            StatusCode::TOO_MANY_REQUESTS => throttled = Some(r),
            other => panic!("a storm login answered {other}"),
        }
    }
    assert!(unauthorized <= 10, "{unauthorized} password checks for one account in a burst (limit 10 a minute)");
    assert_throttled(throttled.expect("some were throttled"), StatusCode::TOO_MANY_REQUESTS, "too many login attempts")
        .await;
    app.stop().await;
}

#[tokio::test]
async fn guessing_from_one_address_is_throttled_and_other_addresses_are_not() {
    let abuse = identity::AbuseLimits { login_per_address_per_minute: 5, ..Tuning::default().abuse };
    let app = TestApp::spawn_with(behind_ingress(Tuning { abuse, ..Default::default() })).await;

    // Different accounts, one address: the address's limit.
    for i in 0..5 {
        let r = login_from(&app, "198.51.100.7", &format!("guess{i}@example.com"), "password1").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let r = login_from(&app, "198.51.100.7", "guess6@example.com", "password1").await;
    assert_throttled(r, StatusCode::TOO_MANY_REQUESTS, "from this address").await;
    let r = login_from(&app, "198.51.100.8", "guess6@example.com", "password1").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "another address is not throttled");
    app.stop().await;
}

#[tokio::test]
async fn a_client_cannot_escape_the_address_limit_by_sending_its_own_forwarding_header() {
    // No ingress: the gateway trusts no header, so every request below comes
    // from the same peer (127.0.0.1), whatever X-Forwarded-For it claims.
    let abuse = identity::AbuseLimits { login_per_address_per_minute: 3, ..Tuning::default().abuse };
    let app = TestApp::spawn_with(Tuning { abuse, ..Default::default() }).await;
    for i in 0..4 {
        let r = app
            .http
            .post(app.url("/identity/login"))
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .header("x-real-ip", format!("203.0.113.{i}"))
            .json(&json!({"email": format!("spoof{i}@example.com"), "password": "password1"}))
            .send()
            .await
            .unwrap();
        if i < 3 {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "attempt {i}");
        } else {
            assert_throttled(r, StatusCode::TOO_MANY_REQUESTS, "from this address").await;
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn registrations_from_one_address_are_throttled() {
    let abuse = identity::AbuseLimits { register_per_address_per_minute: 2, ..Tuning::default().abuse };
    let app = TestApp::spawn_with(behind_ingress(Tuning { abuse, ..Default::default() })).await;
    let register = |address: &'static str, i: u32| {
        app.http
            .post(app.url("/identity/register"))
            .header("x-real-ip", address)
            .json(&json!({"email": format!("flood{i}@example.com"), "password": "correct horse"}))
            .send()
    };
    for i in 0..2 {
        assert_eq!(register("198.51.100.20", i).await.unwrap().status(), StatusCode::CREATED);
    }
    let r = register("198.51.100.20", 2).await.unwrap();
    assert_throttled(r, StatusCode::TOO_MANY_REQUESTS, "registrations from this address").await;
    assert_eq!(register("198.51.100.21", 3).await.unwrap().status(), StatusCode::CREATED);
    app.stop().await;
}

#[tokio::test]
async fn password_checks_beyond_the_bound_are_shed_with_503_and_retry_after() {
    // One check at a time, hardly any wait, no throttles: the bound alone.
    let abuse = identity::AbuseLimits {
        password_hash_concurrency: 1,
        password_hash_wait_ms: 1,
        login_per_address_per_minute: 0,
        login_per_account_per_minute: 0,
        ..Default::default()
    };
    let app = TestApp::spawn_with(Tuning { abuse, ..Default::default() }).await;
    let a = &app;
    let logins = (0..30).map(|i| async move { a.login(&format!("busy{i}@example.com"), "password1").await });
    let answers = futures::future::join_all(logins).await;
    let mut shed = None;
    for r in answers {
        match r.status() {
            StatusCode::UNAUTHORIZED => {}
            StatusCode::SERVICE_UNAVAILABLE => shed = Some(r),
            other => panic!("answered {other}"),
        }
    }
    assert_throttled(shed.expect("some were shed"), StatusCode::SERVICE_UNAVAILABLE, "too many password checks").await;
    app.stop().await;
}
