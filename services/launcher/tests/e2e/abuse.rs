//! Abuse: login storms, guessing from one address, registration floods,
//! more password checks than the machine can run at once, and floods of the
//! calls with a price (orders, deposits, withdrawals, the e-mails they
//! cause). Each is answered 429 or 503 with `Retry-After` and the error body,
//! never with a 500, while other users (and the account's owner on a device
//! they logged in from before) go on.

use crate::helpers::*;
use order_system::system::SystemConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

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

/// The gateway behind an ingress that names the client in `X-Real-IP`.
fn behind_ingress(config: &mut SystemConfig) {
    config.gateway_client_ip_header = Some("x-real-ip".into());
}

#[tokio::test]
async fn a_login_storm_on_one_account_is_throttled_while_another_user_logs_in() {
    let app = TestApp::spawn_with(behind_ingress).await;
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
    let app = TestApp::spawn_with(|c| {
        behind_ingress(c);
        c.abuse.login_per_address_per_minute = 5;
    })
    .await;

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
    let app = TestApp::spawn_with(|c| c.abuse.login_per_address_per_minute = 3).await;
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
    let app = TestApp::spawn_with(|c| {
        behind_ingress(c);
        c.abuse.register_per_address_per_minute = 2;
    })
    .await;
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
    let app = TestApp::spawn_with(|c| c.abuse = abuse).await;
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

/// The `deviceToken=...` pair of a login's `Set-Cookie`s, if it set one.
fn device_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers().get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
        assert!(!c.starts_with("deviceToken=") || (c.contains("HttpOnly") && c.contains("SameSite=Strict")), "{c}");
        c.starts_with("deviceToken=").then(|| c.split(';').next().unwrap().to_string())
    })
}

async fn login_with_cookie(
    app: &TestApp,
    address: &str,
    cookie: &str,
    email: &str,
    password: &str,
) -> reqwest::Response {
    app.http
        .post(app.url("/identity/login"))
        .header("x-real-ip", address)
        .header("cookie", cookie)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("gateway answers")
}

#[tokio::test]
async fn guessers_lock_an_account_but_not_its_owner_on_a_device_that_logged_in_before() {
    let app = TestApp::spawn_with(|c| {
        behind_ingress(c);
        c.abuse.login_per_account_per_minute = 3;
        c.abuse.login_per_device_per_minute = 2;
    })
    .await;
    let owner = app.user().await; // one login, without a device cookie
    let other = app.user().await;

    // The owner logs in on their laptop: it gets a device cookie.
    let r = login_from(&app, "192.0.2.10", &owner.email, "correct horse").await;
    assert_eq!(r.status(), StatusCode::OK);
    let laptop = device_cookie(&r).expect("a device cookie");

    // Guessers from many addresses spend what is left of the account's limit.
    for i in 0..4 {
        let r = login_from(&app, &format!("10.66.0.{i}"), &owner.email, "wrong password").await;
        assert!([StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS].contains(&r.status()), "{}", r.status());
    }
    let r = login_from(&app, "192.0.2.11", &owner.email, "correct horse").await;
    assert_throttled(r, StatusCode::TOO_MANY_REQUESTS, "for this account").await;

    // The laptop still gets in with the right password, and keeps its cookie.
    let r = login_with_cookie(&app, "192.0.2.10", &laptop, &owner.email, "correct horse").await;
    assert_eq!(r.status(), StatusCode::OK, "the owner's known device is not locked out");
    assert_eq!(device_cookie(&r), None, "a known device keeps its cookie");

    // The cookie is the owner's only: no use for another account, nor forged.
    for i in 0..3 {
        login_from(&app, &format!("10.67.0.{i}"), &other.email, "wrong password").await;
    }
    let r = login_with_cookie(&app, "192.0.2.10", &laptop, &other.email, "correct horse").await;
    assert_throttled(r, StatusCode::TOO_MANY_REQUESTS, "for this account").await;
    // Its last character changed (to another one: a cookie ending in '0'
    // must not be "forged" into itself).
    let last = if laptop.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &laptop[..laptop.len() - 1]);
    assert_ne!(forged, laptop);
    let r = login_with_cookie(&app, "192.0.2.12", &forged, &owner.email, "correct horse").await;
    assert_throttled(r, StatusCode::TOO_MANY_REQUESTS, "for this account").await;

    // Guessing from the device has a limit of its own.
    let r = login_with_cookie(&app, "192.0.2.10", &laptop, &owner.email, "wrong password").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = login_with_cookie(&app, "192.0.2.10", &laptop, &owner.email, "correct horse").await;
    assert_throttled(r, StatusCode::TOO_MANY_REQUESTS, "from this device").await;
    app.stop().await;
}

#[tokio::test]
async fn orders_deposits_and_withdrawals_past_a_users_rate_get_429_and_other_users_go_on() {
    let per_user = runtime::http::PerUserLimits {
        orders_per_user_per_minute: 2,
        deposits_per_user_per_minute: 2,
        withdrawals_per_user_per_minute: 2,
    };
    let app = TestApp::spawn_with(|c| c.per_user = per_user).await;
    let (greedy, other) = (app.user().await, app.user().await);
    for (path, body, what) in [
        ("/billing/account/deposit", json!({"amount": 5}), "too many deposits"),
        ("/billing/account/withdraw", json!({"amount": 1}), "too many withdrawals"),
        ("/ordering/orders", json!({"price": 1}), "too many orders"),
    ] {
        for _ in 0..2 {
            let r = app.post(&greedy, path, body.clone()).await;
            assert!(r.status().is_success(), "{path}: {}", r.status());
        }
        assert_throttled(app.post(&greedy, path, body.clone()).await, StatusCode::TOO_MANY_REQUESTS, what).await;
        let r = app.post(&other, path, json!({"amount": 0.01, "price": 0.01})).await;
        assert_ne!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{path}: another user has their own allowance");
    }
    // Two deposits of 5, two withdrawals of 1 and two orders of 1, nothing more.
    assert_eq!(order_total(&app, &greedy).await, 2.0);
    assert_eq!(app.balance(&greedy).await, 6.0);
    app.stop().await;
}

/// What the user's succeeded orders cost.
async fn order_total(app: &TestApp, user: &User) -> f64 {
    let orders: Vec<Value> = eventually(Duration::from_secs(10), || async {
        let orders: Vec<Value> = app.get(user, "/ordering/orders").await;
        orders.iter().all(|o| o["status"] != "pending").then_some(orders)
    })
    .await;
    orders.iter().filter(|o| o["status"] == "succeeded").map(|o| o["price"].as_f64().unwrap()).sum()
}

#[tokio::test]
async fn a_burst_of_failed_orders_mails_the_address_at_most_its_budget_and_lists_every_notification() {
    let app = TestApp::spawn_with(|c| c.mail.emails_per_recipient_per_hour = 2).await;
    // No money: every order fails, and each failure is a notification.
    let user = app.user().await;
    for _ in 0..5 {
        app.place_order(&user, 1).await;
    }
    let db = app.db("notification").await;
    eventually_counts(
        Duration::from_secs(30),
        &db,
        "SELECT count(*) FROM email_deliveries WHERE user_id = $1 AND (sent_at IS NOT NULL OR suppressed_at IS NOT NULL)",
        user.id,
        5,
    )
    .await;
    let sent = test_support::count(
        &db,
        "SELECT count(*) FROM email_deliveries WHERE user_id = $1 AND sent_at IS NOT NULL",
        user.id,
    )
    .await;
    assert_eq!(sent, 2, "the budget");
    let notifications: Vec<Value> = app.get(&user, "/notifications").await;
    assert_eq!(notifications.len(), 5, "every notification is stored and listed");
    let mails = eventually(Duration::from_secs(10), || async {
        let mails: Vec<String> = app.smtp.messages().into_iter().filter(|m| m.contains(&user.email)).collect();
        (mails.len() >= 2).then_some(mails)
    })
    .await;
    assert_eq!(mails.len(), 2, "the address got its budget, no more");
    let metrics = app.http.get(format!("{}/metrics", app.gateway)).send().await.unwrap().text().await.unwrap();
    let suppressed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("emails_suppressed_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("emails_suppressed_total");
    assert!(suppressed >= 3.0, "{suppressed}");
    app.stop().await;
}
