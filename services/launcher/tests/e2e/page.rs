//! What the page is served with: the token cookie `Secure` over HTTPS, and
//! headers that keep other origins' scripts, frames and sniffing out.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;

fn tls_client() -> reqwest::Client {
    reqwest::Client::builder().use_rustls_tls().danger_accept_invalid_certs(true).build().unwrap()
}

async fn token_cookie(client: &reqwest::Client, base: &str, email: &str) -> String {
    let r = client
        .post(format!("{base}/api/v1/identity/login"))
        .json(&json!({"email": email, "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("accessToken="), "{cookie}");
    cookie
}

#[tokio::test]
async fn the_token_cookie_is_secure_when_the_page_is_served_over_https() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let https = token_cookie(&tls_client(), &app.gateway_https, &user.email).await;
    assert!(https.split(';').any(|a| a.trim() == "Secure"), "{https}");
    assert!(https.contains("HttpOnly") && https.contains("SameSite=Strict"), "{https}");
    // Plain HTTP (a developer's http://127.0.0.1:8080): a Secure cookie
    // would never come back there.
    let http = token_cookie(&app.http, &app.gateway, &user.email).await;
    assert!(!http.contains("Secure"), "{http}");
    app.stop().await;
}

#[tokio::test]
async fn the_page_forbids_framing_sniffing_and_foreign_scripts() {
    let app = TestApp::spawn().await;
    for path in ["/", "/app.js", "/app.css"] {
        let r = tls_client().get(format!("{}{path}", app.gateway_https)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in ["default-src 'self'", "frame-ancestors 'none'", "object-src 'none'"] {
            assert!(csp.contains(directive), "{path}: {csp} lacks {directive}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    }
    app.stop().await;
}
