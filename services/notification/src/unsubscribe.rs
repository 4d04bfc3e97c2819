//! Unsubscribing from e-mail without logging in: every e-mail carries a link
//! with a token signed for its recipient (HMAC-SHA256 with
//! `UNSUBSCRIBE_SECRET`), sent as `List-Unsubscribe` with
//! `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058) so that a
//! mail client can unsubscribe in one click. A GET of the link only shows a
//! page that asks to confirm (link scanners follow GETs); the POST, from that
//! page or from the mail client, records the choice. It stops the e-mails to
//! that user; their notifications are still stored and listed.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use contracts::api::ErrorBody;
use ring::hmac;
use runtime::http::responses::UnexpectedError;
use runtime::{ApiError, Query};
use sqlx::PgPool;
use std::sync::Arc;
use url::Url;
use uuid::Uuid;

/// The public path of the unsubscribe endpoint (through the gateway).
pub const PATH: &str = "/api/v1/notifications/unsubscribe";

/// The shortest secret accepted: a token is only as strong as its key.
const MIN_SECRET_LEN: usize = 32;

/// Where the unsubscribe links of the e-mails point and how they are signed.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct UnsubscribeConfig {
    /// The address users reach the system at (the gateway), e.g.
    /// `https://orders.example.com`: the e-mails' unsubscribe links start with it.
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<Url>,

    /// The key the unsubscribe links are signed with (at least 32 characters;
    /// the same on every replica). Without it, e-mails carry no
    /// `List-Unsubscribe` header and the endpoint refuses every link.
    #[arg(long, env = "UNSUBSCRIBE_SECRET", hide_env_values = true)]
    pub unsubscribe_secret: Option<String>,

    /// An address that unsubscribes too (sent as the `mailto:` of
    /// `List-Unsubscribe`, beside the link), if mail to it reaches an operator.
    #[arg(long, env = "UNSUBSCRIBE_MAILTO")]
    pub unsubscribe_mailto: Option<String>,
}

/// Signs and checks unsubscribe tokens, and writes the links.
pub struct Links {
    key: hmac::Key,
    public_url: Url,
    mailto: Option<String>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").field("public_url", &self.public_url.as_str()).finish_non_exhaustive()
    }
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token at all (wrong length, not base64url).
    Malformed,
    /// A token, but not one this system signed.
    Forged,
}

impl Links {
    /// `None` when unsubscribe links are not configured; an error for a
    /// configuration that cannot work (a short secret, a secret without
    /// `PUBLIC_URL`, a URL that is not http(s)).
    pub fn from_config(config: &UnsubscribeConfig) -> anyhow::Result<Option<Links>> {
        let Some(secret) = &config.unsubscribe_secret else {
            if config.public_url.is_some() {
                tracing::warn!("PUBLIC_URL is set but UNSUBSCRIBE_SECRET is not: e-mails carry no unsubscribe link");
            }
            return Ok(None);
        };
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_LEN,
            "UNSUBSCRIBE_SECRET must be at least {MIN_SECRET_LEN} characters (e.g. `openssl rand -base64 32`)"
        );
        let Some(public_url) = config.public_url.clone() else {
            anyhow::bail!(
                "UNSUBSCRIBE_SECRET is set but PUBLIC_URL is not: the unsubscribe links need the public address"
            )
        };
        anyhow::ensure!(
            matches!(public_url.scheme(), "https" | "http") && public_url.host().is_some(),
            "PUBLIC_URL {public_url} must be an http(s) URL with a host"
        );
        if public_url.scheme() == "http" {
            tracing::warn!(%public_url, "PUBLIC_URL is not https: mail providers expect https unsubscribe links");
        }
        if let Some(mailto) = &config.unsubscribe_mailto {
            runtime::contact::Email::parse(mailto)
                .map_err(|e| anyhow::anyhow!("UNSUBSCRIBE_MAILTO {mailto:?}: {e}"))?;
        }
        Ok(Some(Links {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
            public_url,
            mailto: config.unsubscribe_mailto.clone(),
        }))
    }

    fn signed(&self, user_id: Uuid) -> hmac::Tag {
        hmac::sign(&self.key, &Self::input(user_id))
    }

    /// What is signed: a purpose, so that a tag made with the same key for
    /// anything else can never pass as an unsubscribe token.
    fn input(user_id: Uuid) -> Vec<u8> {
        [b"unsubscribe\0".as_slice(), user_id.as_bytes()].concat()
    }

    /// The user's token: their id and its signature, base64url.
    pub fn token(&self, user_id: Uuid) -> String {
        URL_SAFE_NO_PAD.encode([user_id.as_bytes().as_slice(), self.signed(user_id).as_ref()].concat())
    }

    /// The user the token was signed for.
    pub fn verify(&self, token: &str) -> Result<Uuid, TokenError> {
        let bytes = URL_SAFE_NO_PAD.decode(token.trim()).map_err(|_| TokenError::Malformed)?;
        if bytes.len() != 16 + 32 {
            return Err(TokenError::Malformed);
        }
        let (id, tag) = bytes.split_at(16);
        let user_id = Uuid::from_slice(id).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, &Self::input(user_id), tag).map_err(|_| TokenError::Forged)?;
        Ok(user_id)
    }

    /// The https link that unsubscribes the user (GET: a page that asks to
    /// confirm; POST: unsubscribes).
    pub fn url(&self, user_id: Uuid) -> Url {
        let mut url = self.public_url.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}{PATH}"));
        url.query_pairs_mut().clear().append_pair("token", &self.token(user_id));
        url
    }

    /// The `List-Unsubscribe` value (RFC 2369): the link, and the mailto if configured.
    pub fn list_unsubscribe(&self, user_id: Uuid) -> String {
        let mut value = format!("<{}>", self.url(user_id));
        if let Some(mailto) = &self.mailto {
            value.push_str(&format!(", <mailto:{mailto}?subject=unsubscribe%20{}>", self.token(user_id)));
        }
        value
    }
}

/// The endpoint's state.
#[derive(Clone)]
pub struct Unsubscribe {
    pub db: PgPool,
    pub links: Option<Arc<Links>>,
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenParam {
    /// The token of the e-mail's unsubscribe link.
    pub token: String,
}

impl Unsubscribe {
    fn user(&self, token: &str) -> Result<Uuid, ApiError> {
        let Some(links) = &self.links else {
            return Err(ApiError::not_found("unsubscribe links are not in use here"));
        };
        links.verify(token).map_err(|e| match e {
            TokenError::Malformed => ApiError::bad_request("this is not an unsubscribe link"),
            TokenError::Forged => ApiError::new(StatusCode::FORBIDDEN, "this unsubscribe link is not valid"),
        })
    }
}

/// The unsubscribe endpoint's refusals.
#[derive(utoipa::IntoResponses)]
pub enum Refused {
    #[response(status = 400, description = "Not an unsubscribe token")]
    Malformed(ErrorBody),
    #[response(status = 403, description = "A token this system did not sign")]
    Forged(ErrorBody),
    #[response(status = 404, description = "Unsubscribe links are not configured here")]
    NotConfigured(ErrorBody),
}

#[utoipa::path(get, path = "/api/v1/notifications/unsubscribe", tag = "notifications", operation_id = "unsubscribePage",
    description = "The page an e-mail's unsubscribe link opens: it asks to confirm, and changes nothing by itself \
                   (mail scanners follow links). No login: the token is the authority.",
    params(TokenParam),
    security(()),
    responses(
        (status = 200, description = "A page with a button that unsubscribes (a POST of the same link)", content_type = "text/html", body = String),
        Refused,
        UnexpectedError,
    ))]
pub async fn page(State(state): State<Unsubscribe>, Query(q): Query<TokenParam>) -> Result<Response, ApiError> {
    let user_id = state.user(&q.token)?;
    tracing::info!(user_id = %user_id, "unsubscribe page shown");
    let token = escape_html(&q.token);
    Ok(html(&format!(
        "<h1>Stop e-mails about your orders?</h1>\
         <p>You will still see your notifications in the app.</p>\
         <form method=\"post\" action=\"?token={token}\">\
         <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <button type=\"submit\">Unsubscribe</button></form>"
    )))
}

#[utoipa::path(post, path = "/api/v1/notifications/unsubscribe", tag = "notifications", operation_id = "unsubscribe",
    description = "Stops the e-mails to the token's user (RFC 8058 one-click: the body `List-Unsubscribe=One-Click`, \
                   which is not required). Notifications are still stored and listed. Idempotent. No login: the \
                   token is the authority.",
    params(TokenParam),
    security(()),
    responses(
        (status = 200, description = "Unsubscribed (or already was)", content_type = "text/html", body = String),
        Refused,
        UnexpectedError,
    ))]
pub async fn unsubscribe(State(state): State<Unsubscribe>, Query(q): Query<TokenParam>) -> Result<Response, ApiError> {
    let user_id = state.user(&q.token)?;
    let stored =
        sqlx::query!("INSERT INTO email_unsubscribes (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING", user_id)
            .execute(&state.db)
            .await?
            .rows_affected();
    metrics::counter!("email_unsubscribes_total").increment(stored);
    tracing::info!(user_id = %user_id, new = stored == 1, "unsubscribed from e-mail");
    Ok(html(
        "<h1>Unsubscribed</h1><p>You will get no more e-mails about your orders. \
             Your notifications are still in the app.</p>",
    ))
}

/// A small page of its own, allowed to do nothing but post its form here.
fn html(body: &str) -> Response {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>E-mail preferences</title></head>\
         <body>{body}</body></html>"
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'; form-action 'self'; frame-ancestors 'none'"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

/// Text made safe for HTML element content and quoted attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(secret: &str) -> Links {
        let config = UnsubscribeConfig {
            public_url: Some("https://orders.example.com/base/".parse().unwrap()),
            unsubscribe_secret: Some(secret.into()),
            unsubscribe_mailto: Some("unsubscribe@example.com".into()),
        };
        Links::from_config(&config).unwrap().unwrap()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_token_names_its_user_and_only_its_key_signed_it() {
        let links = links(SECRET);
        let user = Uuid::new_v4();
        let token = links.token(user);
        assert_eq!(links.verify(&token), Ok(user));

        let other = links_with_other_key();
        assert_eq!(other.verify(&token), Err(TokenError::Forged));

        // Another user's id with this user's signature.
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        assert_eq!(links.verify(&URL_SAFE_NO_PAD.encode(&bytes)), Err(TokenError::Forged));

        for bad in ["", "x", "not base64 !", &token[..token.len() - 2]] {
            assert_eq!(links.verify(bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    fn links_with_other_key() -> Links {
        links("another secret of enough length, 32+")
    }

    #[test]
    fn the_link_is_under_the_public_url_and_the_header_lists_both_ways() {
        let links = links(SECRET);
        let user = Uuid::new_v4();
        let url = links.url(user);
        assert!(url.as_str().starts_with("https://orders.example.com/base/api/v1/notifications/unsubscribe?token="));
        let header = links.list_unsubscribe(user);
        assert!(header.starts_with(&format!("<{url}>, <mailto:unsubscribe@example.com?subject=")), "{header}");
    }

    #[test]
    fn a_configuration_that_cannot_work_is_refused_at_start() {
        let short = UnsubscribeConfig {
            public_url: Some("https://x.example".parse().unwrap()),
            unsubscribe_secret: Some("short".into()),
            unsubscribe_mailto: None,
        };
        assert!(Links::from_config(&short).unwrap_err().to_string().contains("UNSUBSCRIBE_SECRET"));
        let no_url = UnsubscribeConfig { public_url: None, unsubscribe_secret: Some(SECRET.into()), ..short.clone() };
        assert!(Links::from_config(&no_url).unwrap_err().to_string().contains("PUBLIC_URL"));
        let ftp = UnsubscribeConfig { public_url: Some("ftp://x.example".parse().unwrap()), ..no_url.clone() };
        assert!(Links::from_config(&ftp).unwrap_err().to_string().contains("PUBLIC_URL"));
        let mailto = UnsubscribeConfig {
            public_url: Some("https://x.example".parse().unwrap()),
            unsubscribe_mailto: Some("not an address".into()),
            ..no_url
        };
        assert!(Links::from_config(&mailto).unwrap_err().to_string().contains("UNSUBSCRIBE_MAILTO"));
        assert!(Links::from_config(&UnsubscribeConfig::default()).unwrap().is_none());
    }

    #[test]
    fn html_escaping_covers_text_and_attributes() {
        assert_eq!(
            escape_html(r#"<b>"Tom" & 'Jerry'</b>"#),
            "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;"
        );
    }
}
