//! Services behind the gateway trust no header: a process that reaches a
//! service's internal port directly needs an assertion signed with the
//! gateway's key, for that service, and not expired (`runtime::auth`).

use crate::helpers::{ASSERTION, TestApp, as_current, assert_error};
use reqwest::StatusCode;

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
        refused(get().header(ASSERTION, stranger.sign(service, &as_current(&user))).send().await.unwrap()).await;
        // Expired (past the clock leeway).
        let old = app.signer.sign_at(service, &as_current(&user), now - runtime::auth::ASSERTION_TTL_SECS - 10);
        refused(get().header(ASSERTION, old).send().await.unwrap()).await;
        // Meant for another service: one a service received cannot be replayed elsewhere.
        let elsewhere = if service == "billing" { "ordering" } else { "billing" };
        refused(get().header(ASSERTION, app.assertion(elsewhere, &user)).send().await.unwrap()).await;
        // The token alone is for the gateway (and the push service's HTTPS port).
        refused(get().bearer_auth(&user.token).send().await.unwrap()).await;

        // The gateway's own, for this service, is accepted.
        let r = get().header(ASSERTION, app.assertion(service, &user)).send().await.unwrap();
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
