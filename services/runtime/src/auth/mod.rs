//! The caller's identity inside the system: the gateway's signed assertion.
//!
//! The gateway verifies the user's access token and then signs, for each
//! request it forwards, a short-lived assertion of who the caller is: an
//! EdDSA (Ed25519) JWT in `X-User-Assertion` carrying the user's id and
//! e-mail, the access token's `jti` and `exp` (for logout, and for the end
//! of a stream opened with it), its own unique id (`jti`), the method and
//! path it was issued for (`htm`, `htu`), `iat`, `exp` (a few seconds,
//! [`ASSERTION_TTL_SECS`]), issuer `gateway` and, as audience, the one
//! service the request goes to. Services behind it verify the assertion with
//! the gateway's public key only ([`VerifyKeys`], `INTERNAL_VERIFY_KEY`):
//! a process that can reach an internal port cannot act as another user,
//! and a service (which holds no private key) cannot mint assertions, nor
//! use one it received for anything but the request it came with: another
//! service refuses it (the audience differs), another method or path too,
//! and so does the same service the second time (a bounded cache of the
//! ids seen while they are valid). The user's own token never leaves the
//! gateway. A bare `X-User-Id` means nothing anywhere.
//!
//! DESIGN: asymmetric keys rather than a shared secret (HMAC), so that
//! compromising any service but the gateway gives no power to speak for
//! users; a per-request assertion rather than each service checking the
//! user's token itself, so that the services need neither identity's keys
//! nor the revoked-token list (the gateway judges those once). Signing
//! costs about 55 µs and verifying about 60 µs (`cargo bench -p runtime
//! --bench assertion`, 2 cores under load), against milliseconds for the
//! request: no caching.

pub mod tls;
pub mod tokens;

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::extract::OriginalUri;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use uuid::Uuid;

use crate::ApiError;

/// The one header that says who the caller is; only the gateway sets it
/// (it drops any a client sent).
pub const ASSERTION_HEADER: &str = "x-user-assertion";

/// Headers that only the gateway may set; it drops any a client sent.
pub const INTERNAL_HEADERS: &[&str] = &[ASSERTION_HEADER];

/// How long an assertion is valid: one request's start, not its length (a
/// stream or long poll is checked when it begins; the gateway signs it just
/// before it forwards the request).
pub const ASSERTION_TTL_SECS: i64 = 5;

/// The issuer of every assertion.
const ISSUER: &str = "gateway";

/// Clock skew allowed between the gateway and a service.
const LEEWAY_SECS: u64 = 2;

/// Assertion ids a service remembers at most (each until its assertion
/// expires): far more than a replica receives in an assertion's life. Full
/// of unexpired ids, it answers 503 rather than forget one.
pub const REPLAY_CACHE_CAPACITY: usize = 100_000;

/// The authenticated user of a request, and the access token it came with.
#[derive(Clone, Debug)]
pub struct CurrentUser {
    pub id: Uuid,
    pub email: String,
    /// The access token's `jti` (what a logout revokes).
    pub token_id: Uuid,
    /// The access token's `exp` (seconds since the epoch).
    pub token_expires: i64,
}

impl CurrentUser {
    /// Resolves when the access token this user came with has expired (its
    /// `exp`, through the gateway's clock leeway for tokens, as the gateway
    /// counts it): what a stream opened with an assertion lives until.
    pub async fn token_expired(&self) {
        let end = self.token_expires.saturating_add(crate::auth::tokens::LEEWAY_SECS as i64 + 1);
        let left = end.saturating_sub(chrono::Utc::now().timestamp()).max(0) as u64;
        tokio::time::sleep(std::time::Duration::from_secs(left)).await;
    }
}

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: Uuid,
    email: String,
    /// The access token's `jti` and `exp`.
    tid: Uuid,
    texp: i64,
    /// The assertion's own id: a service accepts it once.
    jti: Uuid,
    /// The method and path (the service's own, without the query) it was
    /// issued for.
    htm: String,
    htu: String,
    iat: i64,
    exp: i64,
}

/// The 12-byte DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410).
const SPKI_ED25519_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// A key's id: a digest of its public half, so that verifiers holding
/// several keys (a rotation) pick the right one.
fn kid_of(public: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(&ring::digest::digest(&ring::digest::SHA256, public).as_ref()[..9])
}

fn pem_body(text: &str) -> Option<String> {
    text.contains("-----BEGIN").then(|| text.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect())
}

/// The gateway's private key (Ed25519, PKCS#8).
#[derive(Clone)]
pub struct AssertionSigner(Arc<SignerInner>);

struct SignerInner {
    kid: String,
    /// Parsed once: parsing derives the public key, which costs as much as
    /// a signature (jsonwebtoken's `encode` did it for every assertion).
    pair: Ed25519KeyPair,
    /// The JOSE header's base64url, the same in every assertion of this key.
    header: String,
    pkcs8: Vec<u8>,
    public: Vec<u8>,
}

/// [`Claims`] borrowed, to sign without copying the request's strings.
#[derive(Serialize)]
struct ClaimsRef<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: Uuid,
    email: &'a str,
    tid: Uuid,
    texp: i64,
    jti: Uuid,
    htm: &'a str,
    htu: &'a str,
    iat: i64,
    exp: i64,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AssertionSigner(kid {}, private key not shown)", self.0.kid)
    }
}

impl AssertionSigner {
    /// A new random key.
    pub fn generate() -> Self {
        let der = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("the system's random source");
        Self::from_pkcs8(der.as_ref()).expect("ring's own PKCS#8")
    }

    pub fn from_pkcs8(der: &[u8]) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| anyhow::anyhow!("not an Ed25519 private key in PKCS#8: {e}"))?;
        let public = pair.public_key().as_ref().to_vec();
        let kid = kid_of(&public);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.clone());
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
        Ok(AssertionSigner(Arc::new(SignerInner { kid, pair, header, pkcs8: der.to_vec(), public })))
    }

    /// A PEM (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm
    /// ed25519` writes) or the base64 of the PKCS#8 DER (as `order-system
    /// internal-keys` prints).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let body = pem_body(text).unwrap_or_else(|| text.trim().to_string());
        let der = STANDARD.decode(body.trim()).context("the private key is neither PEM nor base64")?;
        Self::from_pkcs8(&der)
    }

    /// For clap: `INTERNAL_SIGNING_KEY`.
    pub fn parse_arg(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| format!("{e:#}"))
    }

    /// For clap: `INTERNAL_SIGNING_KEY_FILE`.
    pub fn read_arg(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("{path}: {e:#}"))
    }

    /// The private key as `parse` reads it (base64 of the PKCS#8 DER).
    pub fn private_key_text(&self) -> String {
        STANDARD.encode(&self.0.pkcs8)
    }

    /// The public half, to verify with.
    pub fn verify_keys(&self) -> VerifyKeys {
        VerifyKeys::from_raw(vec![self.0.public.clone()])
    }

    /// An assertion that `user` calls `audience` (a service's name) with
    /// `method` on `path` (the service's own path, without the query), once,
    /// from now for [`ASSERTION_TTL_SECS`].
    pub fn sign(&self, audience: &str, method: &Method, path: &str, user: &CurrentUser) -> String {
        self.sign_at(audience, method, path, user, chrono::Utc::now().timestamp())
    }

    /// [`Self::sign`] as of `issued_at` (seconds since the epoch).
    pub fn sign_at(&self, audience: &str, method: &Method, path: &str, user: &CurrentUser, issued_at: i64) -> String {
        let claims = ClaimsRef {
            iss: ISSUER,
            aud: audience,
            sub: user.id,
            email: &user.email,
            tid: user.token_id,
            texp: user.token_expires,
            jti: Uuid::new_v4(),
            htm: method.as_str(),
            htu: path,
            iat: issued_at,
            exp: issued_at + ASSERTION_TTL_SECS,
        };
        let claims = serde_json::to_vec(&claims).expect("claims serialize");
        // A JWS in compact form (RFC 7515): header.claims.signature, as
        // jsonwebtoken writes and reads it.
        let mut jwt = String::with_capacity(self.0.header.len() + claims.len() * 4 / 3 + 92);
        jwt.push_str(&self.0.header);
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut jwt);
        let signature = self.0.pair.sign(jwt.as_bytes());
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut jwt);
        jwt
    }
}

/// The gateway's public key(s): every service verifies assertions with them.
/// Several (comma-separated) while the gateway's key is being replaced.
#[derive(Clone)]
pub struct VerifyKeys(Arc<Vec<(String, Vec<u8>, DecodingKey)>>);

impl std::fmt::Debug for VerifyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyKeys({})", self.text())
    }
}

impl VerifyKeys {
    fn from_raw(keys: Vec<Vec<u8>>) -> Self {
        VerifyKeys(Arc::new(keys.into_iter().map(|k| (kid_of(&k), k.clone(), DecodingKey::from_ed_der(&k))).collect()))
    }

    /// Comma-separated keys, each the base64url of the 32-byte Ed25519
    /// public key (as `order-system internal-keys` prints, and a JWK's `x`)
    /// or a PEM `PUBLIC KEY` (SubjectPublicKeyInfo, as `openssl pkey -pubout`
    /// writes).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let raw = match pem_body(part) {
                Some(body) => {
                    let der = STANDARD.decode(body).context("the PEM public key is not base64")?;
                    der.strip_prefix(&SPKI_ED25519_PREFIX[..])
                        .map(<[u8]>::to_vec)
                        .ok_or_else(|| anyhow::anyhow!("the PEM public key is not an Ed25519 key"))?
                }
                None => URL_SAFE_NO_PAD
                    .decode(part.trim_end_matches('='))
                    .with_context(|| format!("{part:?} is not a base64url public key"))?,
            };
            anyhow::ensure!(raw.len() == 32, "an Ed25519 public key has 32 bytes, not {}", raw.len());
            keys.push(raw);
        }
        anyhow::ensure!(!keys.is_empty(), "no public key given");
        Ok(Self::from_raw(keys))
    }

    /// For clap: `INTERNAL_VERIFY_KEY`.
    pub fn parse_arg(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| format!("{e:#}"))
    }

    /// The keys as `parse` reads them.
    pub fn text(&self) -> String {
        self.0.iter().map(|(_, raw, _)| URL_SAFE_NO_PAD.encode(raw)).collect::<Vec<_>>().join(",")
    }
}

/// What a service checks its callers with: the gateway's public keys and
/// its own name (the audience an assertion must name). The service skeleton
/// puts it in every request's extensions, where [`CurrentUser`] finds it.
#[derive(Clone, Debug)]
pub struct CallerVerifier {
    keys: VerifyKeys,
    /// What an assertion's claims must say (its audience: this service), built once.
    validation: Arc<Validation>,
    seen: Arc<SeenAssertions>,
}

/// The ids of the assertions accepted here, each kept until its assertion
/// has expired (after that it is refused as expired anyway), at most
/// `capacity` of them.
#[derive(Debug)]
struct SeenAssertions {
    capacity: usize,
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    ids: HashMap<Uuid, i64>,
    /// (expiry, id) in the order accepted: nearly the order of expiry, as
    /// every assertion lives as long.
    order: VecDeque<(i64, Uuid)>,
}

#[derive(Debug, PartialEq)]
enum Seeing {
    First,
    Again,
    Full,
}

impl SeenAssertions {
    fn new(capacity: usize) -> Self {
        SeenAssertions { capacity, inner: Mutex::new(Seen::default()) }
    }

    /// Records `id` (valid until `expires`) unless it was seen before.
    fn see(&self, id: Uuid, expires: i64, now: i64) -> Seeing {
        let mut seen = self.inner.lock().expect("seen assertions lock");
        while let Some(&(exp, old)) = seen.order.front()
            && exp < now
        {
            seen.order.pop_front();
            seen.ids.remove(&old);
        }
        if seen.ids.contains_key(&id) {
            return Seeing::Again;
        }
        if seen.ids.len() >= self.capacity {
            return Seeing::Full;
        }
        seen.ids.insert(id, expires);
        seen.order.push_back((expires, id));
        Seeing::First
    }
}

/// A request's caller once verified: a second look (another extractor of
/// the same request) is not a replay.
#[derive(Clone)]
struct Verified(CurrentUser);

impl CallerVerifier {
    pub fn new(keys: VerifyKeys, audience: &'static str) -> Self {
        Self::with_capacity(keys, audience, REPLAY_CACHE_CAPACITY)
    }

    fn with_capacity(keys: VerifyKeys, audience: &'static str, capacity: usize) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        CallerVerifier { keys, validation: Arc::new(validation), seen: Arc::new(SeenAssertions::new(capacity)) }
    }

    /// The user `headers` name in a valid assertion for this service and
    /// this request (`method`, `path`), not seen here before; 401 for a
    /// missing, forged, expired, misdirected or replayed one (503 while
    /// this replica's memory of the assertions it accepted is full).
    pub fn verify(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<CurrentUser, ApiError> {
        let refused = || ApiError::unauthorized("authentication required");
        let token = headers.get(ASSERTION_HEADER).and_then(|v| v.to_str().ok()).ok_or_else(refused)?;
        let kid = jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid).ok_or_else(refused)?;
        let (_, _, key) = self.keys.0.iter().find(|(k, _, _)| *k == kid).ok_or_else(|| {
            tracing::warn!(kid, "an assertion signed with a key not configured here (INTERNAL_VERIFY_KEY)");
            refused()
        })?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| {
                tracing::warn!(error = %e, "an assertion was refused");
                refused()
            })?
            .claims;
        if claims.htm != method.as_str() || claims.htu != path {
            tracing::warn!(issued_for = %format_args!("{} {}", claims.htm, claims.htu), %method, path,
                "an assertion issued for another request was refused");
            return Err(refused());
        }
        let expires = claims.exp.saturating_add(LEEWAY_SECS as i64);
        match self.seen.see(claims.jti, expires, chrono::Utc::now().timestamp()) {
            Seeing::First => {}
            Seeing::Again => {
                tracing::warn!(assertion = %claims.jti, "an assertion seen before was refused (a replay)");
                return Err(refused());
            }
            Seeing::Full => {
                tracing::warn!("too many assertions to remember; refusing until some expire");
                return Err(ApiError::unavailable("the service is busy, try again", std::time::Duration::from_secs(1)));
            }
        }
        Ok(CurrentUser { id: claims.sub, email: claims.email, token_id: claims.tid, token_expires: claims.texp })
    }
}

/// The gateway's public key(s), for every service behind it.
#[derive(clap::Args, Clone, Debug)]
pub struct CallerKeys {
    /// The gateway's public key(s) that callers' assertions are verified
    /// with (`order-system internal-keys` prints a pair); comma-separated
    /// while the gateway's key is replaced. Required: a service never trusts
    /// a request that does not carry a valid assertion.
    #[arg(long = "internal-verify-key", env = "INTERNAL_VERIFY_KEY", value_name = "INTERNAL_VERIFY_KEY",
        value_parser = VerifyKeys::parse_arg)]
    pub verify_keys: VerifyKeys,
}

/// The gateway's private key.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SigningKeyConfig {
    /// The gateway's private key (Ed25519 PKCS#8, PEM or base64) that signs
    /// the assertions the services behind it verify; keep it secret.
    #[arg(long, env = "INTERNAL_SIGNING_KEY", value_parser = AssertionSigner::parse_arg)]
    pub internal_signing_key: Option<AssertionSigner>,
    /// A file holding the private key instead (e.g. a mounted secret).
    #[arg(long, env = "INTERNAL_SIGNING_KEY_FILE", value_parser = AssertionSigner::read_arg,
        conflicts_with = "internal_signing_key")]
    pub internal_signing_key_file: Option<AssertionSigner>,
}

impl SigningKeyConfig {
    pub fn with(signer: AssertionSigner) -> Self {
        SigningKeyConfig { internal_signing_key: Some(signer), internal_signing_key_file: None }
    }

    /// The key, or a configuration error naming what to set.
    pub fn signer(&self) -> anyhow::Result<AssertionSigner> {
        self.internal_signing_key.clone().or_else(|| self.internal_signing_key_file.clone()).ok_or_else(|| {
            anyhow::anyhow!(
                "no INTERNAL_SIGNING_KEY (or INTERNAL_SIGNING_KEY_FILE): the gateway signs the assertions the \
                 services verify; `order-system internal-keys` prints a key pair"
            )
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let user = caller(parts)?;
        tracing::Span::current().record("user_id", tracing::field::display(user.id));
        Ok(user)
    }
}

/// The user of a request, by its assertion, checked with the service's
/// [`CallerVerifier`] (in the request's extensions) against the request's
/// method and path; checked once per request.
pub fn caller(parts: &mut Parts) -> Result<CurrentUser, ApiError> {
    if let Some(Verified(user)) = parts.extensions.get::<Verified>() {
        return Ok(user.clone());
    }
    let verifier = parts
        .extensions
        .get::<CallerVerifier>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("no CallerVerifier on this router")))?;
    // The path the service was asked for, before any nesting stripped it.
    let path = parts.extensions.get::<OriginalUri>().map_or(parts.uri.path(), |u| u.0.path());
    let user = verifier.verify(&parts.method, path, &parts.headers)?;
    parts.extensions.insert(Verified(user.clone()));
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};

    const PATH: &str = "/api/v1/account";

    fn user() -> CurrentUser {
        CurrentUser {
            id: Uuid::parse_str("0193a6a0-0000-7000-8000-000000000001").unwrap(),
            email: "a@example.com".into(),
            token_id: Uuid::new_v4(),
            token_expires: 2_000_000_000,
        }
    }

    fn with_assertion(assertion: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ASSERTION_HEADER, HeaderValue::from_str(assertion).unwrap());
        h
    }

    #[test]
    fn a_valid_assertion_names_its_user_and_token() {
        let signer = AssertionSigner::generate();
        let verifier = CallerVerifier::new(signer.verify_keys(), "billing");
        let u = user();
        let got = verifier
            .verify(&Method::GET, PATH, &with_assertion(&signer.sign("billing", &Method::GET, PATH, &u)))
            .unwrap();
        assert_eq!(
            (got.id, got.email.as_str(), got.token_id, got.token_expires),
            (u.id, "a@example.com", u.token_id, u.token_expires)
        );
    }

    #[test]
    fn no_forged_expired_or_misdirected_assertion_and_no_bare_user_id_is_accepted() {
        let signer = AssertionSigner::generate();
        let verifier = CallerVerifier::new(signer.verify_keys(), "billing");
        let refused = |h: HeaderMap| {
            let e = verifier.verify(&Method::GET, PATH, &h).unwrap_err();
            assert_eq!((e.status, e.message.as_str()), (StatusCode::UNAUTHORIZED, "authentication required"));
        };
        refused(HeaderMap::new());
        let mut bare = HeaderMap::new();
        bare.insert("x-user-id", HeaderValue::from_static("0193a6a0-0000-7000-8000-000000000001"));
        refused(bare);
        refused(with_assertion("not.a.jwt"));
        // Another key, even with this key's id.
        let other = AssertionSigner::generate();
        refused(with_assertion(&other.sign("billing", &Method::GET, PATH, &user())));
        let mut forged: Vec<String> =
            other.sign("billing", &Method::GET, PATH, &user()).split('.').map(String::from).collect();
        let mut header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&forged[0]).unwrap()).unwrap();
        header["kid"] = signer.0.kid.clone().into();
        forged[0] = URL_SAFE_NO_PAD.encode(header.to_string());
        refused(with_assertion(&forged.join(".")));
        // Expired (past the leeway), and for another service.
        let now = chrono::Utc::now().timestamp();
        refused(with_assertion(&signer.sign_at("billing", &Method::GET, PATH, &user(), now - ASSERTION_TTL_SECS - 10)));
        refused(with_assertion(&signer.sign("ordering", &Method::GET, PATH, &user())));
        // Tampered claims.
        let mut parts: Vec<String> =
            signer.sign("billing", &Method::GET, PATH, &user()).split('.').map(String::from).collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        claims["sub"] = Uuid::new_v4().to_string().into();
        parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
        refused(with_assertion(&parts.join(".")));
        // Within the clock leeway it still counts.
        assert!(
            verifier
                .verify(
                    &Method::GET,
                    PATH,
                    &with_assertion(&signer.sign_at(
                        "billing",
                        &Method::GET,
                        PATH,
                        &user(),
                        now - ASSERTION_TTL_SECS + 1
                    ))
                )
                .is_ok()
        );
    }

    #[test]
    fn an_assertion_is_good_for_its_own_method_and_path_once() {
        let signer = AssertionSigner::generate();
        let verifier = CallerVerifier::new(signer.verify_keys(), "billing");
        let refused = |r: Result<CurrentUser, ApiError>| {
            let e = r.unwrap_err();
            assert_eq!((e.status, e.message.as_str()), (StatusCode::UNAUTHORIZED, "authentication required"));
        };
        let deposit = with_assertion(&signer.sign("billing", &Method::POST, "/api/v1/account/deposit", &user()));
        refused(verifier.verify(&Method::POST, "/api/v1/account/withdraw", &deposit));
        refused(verifier.verify(&Method::GET, "/api/v1/account/deposit", &deposit));
        assert!(verifier.verify(&Method::POST, "/api/v1/account/deposit", &deposit).is_ok());
        refused(verifier.verify(&Method::POST, "/api/v1/account/deposit", &deposit));
        // Another replica (its own memory) of the same service would take it
        // once too: what bounds that is the assertion's life of a few seconds.
        let another = CallerVerifier::new(signer.verify_keys(), "billing");
        assert!(another.verify(&Method::POST, "/api/v1/account/deposit", &deposit).is_ok());
    }

    #[test]
    fn a_full_memory_of_assertions_refuses_with_503_and_forgets_only_expired_ones() {
        let seen = SeenAssertions::new(2);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(seen.see(a, 100, 90), Seeing::First);
        assert_eq!(seen.see(b, 105, 90), Seeing::First);
        assert_eq!(seen.see(c, 110, 95), Seeing::Full, "both still valid: none is forgotten");
        assert_eq!(seen.see(a, 100, 95), Seeing::Again);
        // Once `a` has expired it is forgotten (an assertion that old is refused as expired).
        assert_eq!(seen.see(c, 110, 101), Seeing::First);
        assert_eq!(seen.see(b, 105, 101), Seeing::Again);

        let signer = AssertionSigner::generate();
        let verifier = CallerVerifier::with_capacity(signer.verify_keys(), "billing", 1);
        assert!(
            verifier
                .verify(&Method::GET, PATH, &with_assertion(&signer.sign("billing", &Method::GET, PATH, &user())))
                .is_ok()
        );
        let e = verifier
            .verify(&Method::GET, PATH, &with_assertion(&signer.sign("billing", &Method::GET, PATH, &user())))
            .unwrap_err();
        assert_eq!((e.status, e.retry_after.is_some()), (StatusCode::SERVICE_UNAVAILABLE, true));
    }

    #[test]
    fn keys_round_trip_through_their_text_and_several_verify_keys_are_accepted() {
        let (old, new) = (AssertionSigner::generate(), AssertionSigner::generate());
        let again = AssertionSigner::parse(&old.private_key_text()).unwrap();
        let keys = VerifyKeys::parse(&format!("{}, {}", old.verify_keys().text(), new.verify_keys().text())).unwrap();
        let verifier = CallerVerifier::new(keys, "push");
        for s in [&old, &again, &new] {
            assert!(
                verifier
                    .verify(&Method::GET, PATH, &with_assertion(&s.sign("push", &Method::GET, PATH, &user())))
                    .is_ok()
            );
        }
        // PEM, as openssl writes them.
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", old.private_key_text());
        assert_eq!(AssertionSigner::parse(&pem).unwrap().verify_keys().text(), old.verify_keys().text());
        let spki = [&SPKI_ED25519_PREFIX[..], &old.0.public].concat();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----", STANDARD.encode(spki));
        assert_eq!(VerifyKeys::parse(&pem).unwrap().text(), old.verify_keys().text());
    }

    #[test]
    fn bad_keys_are_configuration_errors() {
        assert!(VerifyKeys::parse("").is_err());
        assert!(VerifyKeys::parse("abc").unwrap_err().to_string().contains("32 bytes"));
        assert!(VerifyKeys::parse("not base64!").is_err());
        assert!(AssertionSigner::parse("bm90IGEga2V5").unwrap_err().to_string().contains("PKCS#8"));
        assert!(SigningKeyConfig::default().signer().unwrap_err().to_string().contains("INTERNAL_SIGNING_KEY"));
    }

    #[test]
    fn a_service_without_a_verify_key_does_not_parse_its_configuration() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Service {
            #[command(flatten)]
            callers: CallerKeys,
        }
        let err = Service::try_parse_from(["service"]).unwrap_err().to_string();
        assert!(err.contains("--internal-verify-key <INTERNAL_VERIFY_KEY>"), "{err}");
        let err = Service::try_parse_from(["service", "--internal-verify-key", "abc"]).unwrap_err().to_string();
        assert!(err.contains("32 bytes"), "{err}");
        let key = AssertionSigner::generate().verify_keys().text();
        assert!(Service::try_parse_from(["service", "--internal-verify-key", &key]).is_ok());
    }

    #[test]
    fn token_problems_have_one_answer_each() {
        use crate::auth::tokens::TokenError;
        assert_eq!(ApiError::from(TokenError::Missing).status, StatusCode::UNAUTHORIZED);
        assert!(ApiError::from(TokenError::Invalid).message.contains("invalid, expired or revoked"));
        assert_eq!(ApiError::from(TokenError::Unavailable).status, StatusCode::SERVICE_UNAVAILABLE);
        let stale = ApiError::from(TokenError::RevocationsStale);
        assert_eq!((stale.status, stale.retry_after.is_some()), (StatusCode::SERVICE_UNAVAILABLE, true));
        assert!(stale.message.contains("revoked tokens"));
        let unknown = ApiError::from(TokenError::UnknownKeyYet);
        assert_eq!((unknown.status, unknown.retry_after.is_some()), (StatusCode::SERVICE_UNAVAILABLE, true));
    }
}
