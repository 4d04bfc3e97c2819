//! Services behind the gateway trust no header: a process that reaches a
//! service's internal port directly needs an assertion signed with the
//! gateway's key, for that service, that request (method and path), not
//! expired and not seen before (`runtime::auth`). The user's token stays at
//! the gateway.

use crate::helpers::{ASSERTION, TestApp, as_current, assert_error, eventually};
use reqwest::{Method, StatusCode};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A call of each service that names its user, on the service's own port.
const CALLS: [(&str, &str); 5] = [
    ("identity", "/api/v1/profile"),
    ("billing", "/api/v1/account"),
    ("ordering", "/api/v1/orders"),
    ("notification", "/api/v1/notifications"),
    ("push", "/api/v1/orders"),
];

#[tokio::test]
async fn an_internal_port_refuses_a_bare_user_id_and_forged_expired_or_misdirected_assertions() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let now = chrono::Utc::now().timestamp();
    let stranger = runtime::auth::AssertionSigner::generate();
    for (service, path) in CALLS {
        let url = format!("{}{path}", app.service_url(service));
        let get = || app.http.get(&url);
        let refused = |r: reqwest::Response| assert_error(r, StatusCode::UNAUTHORIZED, "authentication required");

        // What the gateway used to send, and nothing at all.
        let r = get().header("x-user-id", user.id.to_string()).header("x-user-email", &user.email);
        refused(r.send().await.unwrap()).await;
        refused(get().send().await.unwrap()).await;
        // Signed with another key.
        let forged = stranger.sign(service, &Method::GET, path, &as_current(&user));
        refused(get().header(ASSERTION, forged).send().await.unwrap()).await;
        // Expired (past the clock leeway).
        let old = app.signer().sign_at(
            service,
            &Method::GET,
            path,
            &as_current(&user),
            now - runtime::auth::ASSERTION_TTL_SECS - 10,
        );
        refused(get().header(ASSERTION, old).send().await.unwrap()).await;
        // Meant for another service: one a service received cannot be replayed elsewhere.
        let elsewhere = if service == "billing" { "ordering" } else { "billing" };
        refused(get().header(ASSERTION, app.assertion(elsewhere, Method::GET, path, &user)).send().await.unwrap())
            .await;
        // The token alone is for the gateway (and the push service's HTTPS port).
        refused(get().bearer_auth(&user.token).send().await.unwrap()).await;

        // The gateway's own, for this service and this request, is accepted.
        let r = get().header(ASSERTION, app.assertion(service, Method::GET, path, &user)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{service}");
    }
    app.stop().await;
}

#[tokio::test]
async fn logout_through_the_gateway_revokes_the_token_its_assertion_names() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let r = app.post(&user, "/identity/logout", serde_json::json!({})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app.call(Some(&user), reqwest::Method::GET, "/identity/profile", None).await;
    assert_error(r, StatusCode::UNAUTHORIZED, "revoked").await;
    // Revoked in identity's database, which other gateways load.
    let db = app.db("identity").await;
    let revoked: i64 = sqlx::query_scalar("SELECT count(*) FROM revoked_tokens").fetch_one(&db).await.unwrap();
    assert_eq!(revoked, 1);
    db.close().await;
    app.stop().await;
}

#[tokio::test]
async fn an_assertion_is_refused_for_another_method_or_path_and_the_second_time() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    for (service, path) in CALLS {
        let url = format!("{}{path}", app.service_url(service));
        let refused = |r: reqwest::Response| assert_error(r, StatusCode::UNAUTHORIZED, "authentication required");
        // Issued for another path of the service, and for another method.
        let other_path = app.assertion(service, Method::GET, "/api/v1/elsewhere", &user);
        refused(app.http.get(&url).header(ASSERTION, other_path).send().await.unwrap()).await;
        let other_method = app.assertion(service, Method::DELETE, path, &user);
        refused(app.http.get(&url).header(ASSERTION, other_method).send().await.unwrap()).await;

        // Its own is accepted once; the same again is a replay.
        let once = app.assertion(service, Method::GET, path, &user);
        let r = app.http.get(&url).header(ASSERTION, &once).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{service}");
        drop(r);
        refused(app.http.get(&url).header(ASSERTION, &once).send().await.unwrap()).await;
    }
    app.stop().await;
}

/// A service that records the headers of every request it gets: what a
/// compromised service behind the gateway would see.
async fn recording_service() -> (String, Arc<Mutex<Vec<axum::http::HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        record.lock().unwrap().push(headers);
        async { "{}" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn the_users_token_stays_at_the_gateway() {
    let mut app = TestApp::spawn().await;
    let user = app.user().await;
    let (billing, seen) = recording_service().await;
    let gateway = app.gateway_with(|c| c.billing_url = billing.clone()).await;
    let url = format!("{gateway}/api/v1/billing/account");
    let r = app.http.get(&url).bearer_auth(&user.token).header("cookie", "theme=dark").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = format!("theme=dark; accessToken={}; lang=en", user.token);
    let r = app.http.get(&url).header("cookie", cookie).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let seen = eventually(Duration::from_secs(5), || async {
        let seen = seen.lock().unwrap().clone();
        (seen.len() == 2).then_some(seen)
    })
    .await;
    for headers in &seen {
        assert!(!headers.contains_key("authorization"), "{headers:?}");
        let cookies: Vec<_> = headers.get_all("cookie").iter().map(|v| v.to_str().unwrap()).collect();
        assert!(cookies.iter().all(|c| !c.contains(&user.token)), "{cookies:?}");
        assert!(cookies.iter().all(|c| c.contains("theme=dark")), "other cookies go on: {cookies:?}");
        // Who the user is, as the gateway says it, for this request only.
        assert!(headers.contains_key(ASSERTION), "{headers:?}");
    }
    app.stop().await;
}
