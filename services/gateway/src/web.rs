//! The single-page app served at `/`: plain HTML, CSS and JavaScript from
//! `services/gateway/web/`, compiled into the binary (no build step).

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use contracts::api::TOKEN_COOKIE;

const INDEX: &str = include_str!("../web/index.html");
const SCRIPT: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/app.css");
/// Web Push: the opt-in button's script, and the service worker that shows
/// the pushed order outcomes (served from `/` so that its scope is the page).
const WEB_PUSH: &str = include_str!("../web/webpush.js");
const SERVICE_WORKER: &str = include_str!("../web/sw.js");

/// Same-origin only: the page loads nothing from elsewhere.
const CSP: &str = "default-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// On the HTTPS listener: the `accessToken` cookie is `Secure`, so a browser
/// never sends it over cleartext HTTP (identity sets it without knowing how
/// the page was served).
pub async fn secure_token_cookie(mut resp: Response) -> Response {
    let prefix = format!("{TOKEN_COOKIE}=");
    let cookies: Vec<HeaderValue> = resp.headers().get_all(header::SET_COOKIE).iter().cloned().collect();
    if cookies.is_empty() {
        return resp;
    }
    resp.headers_mut().remove(header::SET_COOKIE);
    for cookie in cookies {
        let text = cookie.to_str().unwrap_or_default();
        let secure = text.starts_with(&prefix) && !text.split(';').any(|a| a.trim().eq_ignore_ascii_case("secure"));
        let cookie = match secure {
            true => HeaderValue::from_str(&format!("{text}; Secure")).unwrap_or(cookie),
            false => cookie,
        };
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    resp
}

pub fn routes() -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/webpush.js", get(|| async { asset("text/javascript; charset=utf-8", WEB_PUSH) }))
        .route("/sw.js", get(|| async { asset("text/javascript; charset=utf-8", SERVICE_WORKER) }))
}
