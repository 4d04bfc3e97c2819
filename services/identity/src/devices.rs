//! Device cookies, as OWASP advises against online guessing: a client that
//! logs in to an account gets a cookie, signed by identity, that names the
//! account. A login that presents a valid one for the account it logs in to
//! is counted against that device's own limit instead of the account's, so
//! someone guessing the password (who has no such cookie) cannot lock the
//! owner out of a device they have logged in from before.
//!
//! The cookie is `NONCE.EXPIRY.MAC`: a random id (the device's throttle
//! key), its expiry (Unix seconds) and an HMAC-SHA256 over both and the
//! account's e-mail, keyed from the token signing key. It is no token: it
//! proves nothing but "this client logged in to this account before", and a
//! rotated signing key retires it (the next login sets a new one).

use axum::http::{HeaderMap, HeaderValue};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::keys::{KeyRing, SigningKey};

/// The cookie's name.
pub const DEVICE_COOKIE: &str = "deviceToken";

/// Only logins need it: the public path of identity's login (behind the gateway).
pub const DEVICE_COOKIE_PATH: &str = "/api/v1/identity/login";

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn message(email: &str, nonce: &str, expires: u64) -> String {
    format!("device\n{}\n{nonce}\n{expires}", email.trim().to_lowercase())
}

/// A new device cookie's value for `email`, valid for `ttl`.
pub fn issue(key: &SigningKey, email: &str, ttl: Duration) -> String {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let expires = now_secs() + ttl.as_secs();
    let mac = hmac::sign(key.device_key(), message(email, &nonce, expires).as_bytes());
    format!("{nonce}.{expires}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
}

/// The device id of `value` if it is a device cookie for `email` that has
/// not expired, signed by one of the ring's keys.
pub fn verify(ring: &KeyRing, email: &str, value: &str) -> Option<String> {
    let mut parts = value.split('.');
    let (nonce, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let expires: u64 = expires.parse().ok()?;
    if expires <= now_secs() {
        return None;
    }
    let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
    let message = message(email, nonce, expires);
    ring.keys().any(|k| hmac::verify(k.device_key(), message.as_bytes(), &mac).is_ok()).then(|| nonce.to_string())
}

/// The device id of the first valid device cookie for `email` the request carries.
pub fn from_headers(headers: &HeaderMap, ring: &KeyRing, email: &str) -> Option<String> {
    runtime::auth::tokens::cookies(headers)
        .filter(|(name, _)| *name == DEVICE_COOKIE)
        .find_map(|(_, value)| verify(ring, email, value))
}

/// The `Set-Cookie` of a new device cookie.
pub fn set_cookie(value: &str, ttl: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let c = format!(
        "{DEVICE_COOKIE}={value}; Path={DEVICE_COOKIE_PATH}; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        ttl.as_secs()
    );
    HeaderValue::from_str(&c).expect("cookie is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::single(SigningKey::generated().unwrap())
    }

    #[test]
    fn a_cookie_is_valid_for_its_account_only() {
        let ring = ring();
        let value = issue(&ring.current, "Owner@Example.com", Duration::from_secs(60));
        let id = verify(&ring, " owner@example.com", &value).expect("same account, any case");
        assert_eq!(id.len(), 32);
        assert_eq!(verify(&ring, "other@example.com", &value), None);
    }

    #[test]
    fn a_forged_expired_or_foreign_cookie_is_not_valid() {
        let ring = ring();
        let value = issue(&ring.current, "a@example.com", Duration::from_secs(60));
        let (nonce, rest) = value.split_once('.').unwrap();
        let other_nonce = format!("{}{}", &nonce[..31], if nonce.ends_with('0') { '1' } else { '0' });
        assert_eq!(verify(&ring, "a@example.com", &format!("{other_nonce}.{rest}")), None);
        let expired = issue(&ring.current, "a@example.com", Duration::ZERO);
        assert_eq!(verify(&ring, "a@example.com", &expired), None);
        assert_eq!(verify(&self::ring(), "a@example.com", &value), None, "another key");
        for junk in ["", "x", "a.b.c", &format!("{value}.x")] {
            assert_eq!(verify(&ring, "a@example.com", junk), None, "{junk}");
        }
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let ring = ring();
        let value = issue(&ring.current, "a@example.com", Duration::from_secs(60));
        let mut headers = HeaderMap::new();
        headers.append(axum::http::header::COOKIE, HeaderValue::from_static("accessToken=x; deviceToken=forged"));
        headers.append(
            axum::http::header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {DEVICE_COOKIE}={value}")).unwrap(),
        );
        assert!(from_headers(&headers, &ring, "a@example.com").is_some());
        assert!(from_headers(&headers, &ring, "b@example.com").is_none());
    }
}
