//! VAPID (RFC 8292): the server's P-256 key, and the `Authorization: vapid
//! t=<JWT>, k=<public key>` header that identifies it to a push service.
//!
//! The JWT is signed here rather than by `web-push-native`'s `vapid` feature:
//! that one names the endpoint's scheme and host as the audience, dropping a
//! non-default port, where RFC 8292 §2 asks for the origin; and it would pull
//! a general JWT library (with RSA, EdDSA and post-quantum algorithms) for one
//! ES256 signature.

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a VAPID token is valid: RFC 8292 §2 allows at most 24 hours.
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(12 * 3600);

#[derive(Clone)]
pub struct Vapid {
    key: SigningKey,
    /// The uncompressed public key, base64url: the browser's `applicationServerKey`.
    public_key: String,
    subject: String,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid").field("public_key", &self.public_key).field("subject", &self.subject).finish()
    }
}

impl Vapid {
    /// From a PEM (SEC1 or PKCS#8) or the base64url of the 32-byte scalar,
    /// and the contact (`mailto:` or `https:`).
    pub fn new(key: &str, subject: &str) -> anyhow::Result<Vapid> {
        let key = key.trim();
        let secret = if key.starts_with("-----BEGIN EC PRIVATE KEY-----") {
            p256::SecretKey::from_sec1_pem(key).context("VAPID key: not a P-256 SEC1 PEM")?
        } else if key.starts_with("-----BEGIN PRIVATE KEY-----") {
            p256::SecretKey::from_pkcs8_pem(key).context("VAPID key: not a P-256 PKCS#8 PEM")?
        } else {
            let bytes = URL_SAFE_NO_PAD
                .decode(key.trim_end_matches('='))
                .or_else(|_| URL_SAFE.decode(key))
                .context("VAPID key: neither PEM nor base64url")?;
            p256::SecretKey::from_slice(&bytes).context("VAPID key: not a 32-byte P-256 private key")?
        };
        let subject_ok = subject.strip_prefix("mailto:").is_some_and(|s| s.contains('@'))
            || url::Url::parse(subject).is_ok_and(|u| u.scheme() == "https" && u.host().is_some());
        anyhow::ensure!(subject_ok, "VAPID_SUBJECT {subject:?}: use mailto:someone@example.com or https://...");
        let key = SigningKey::from(secret);
        let public_key = URL_SAFE_NO_PAD.encode(key.verifying_key().to_encoded_point(false).as_bytes());
        Ok(Vapid { key, public_key, subject: subject.to_string() })
    }

    /// The public key as browsers take it (`applicationServerKey`): base64url
    /// of the uncompressed point.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The `Authorization` header value for a push to `endpoint`.
    pub fn authorization(&self, endpoint: &url::Url) -> String {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + TOKEN_VALIDITY;
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({
            "aud": endpoint.origin().ascii_serialization(),
            "exp": exp.as_secs(),
            "sub": self.subject,
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{claims}");
        let signature: Signature = self.key.sign(input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(signature.to_bytes());
        format!("vapid t={input}.{signature}, k={}", self.public_key)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier;

    /// `openssl ecparam -genkey -name prime256v1 -noout`, and the same key as
    /// PKCS#8 and as the base64url of its scalar.
    const KEY_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIAQWFCxmS1P5XvLjxCPwb5RF3w9auxSyOk5hJkPpNIh1oAoGCCqGSM49
AwEHoUQDQgAEn1Nual7xKe52Rin7crHDYkWUz/4iOGF1vFwiROnSmg3yZoW8Ji4U
OthUSjOTOCEGeYx/iarVcNv+WaW2l5mVYQ==
-----END EC PRIVATE KEY-----
";
    const KEY_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBBYULGZLU/le8uPE
I/BvlEXfD1q7FLI6TmEmQ+k0iHWhRANCAASfU25qXvEp7nZGKftyscNiRZTP/iI4
YXW8XCJE6dKaDfJmhbwmLhQ62FRKM5M4IQZ5jH+JqtVw2/5ZpbaXmZVh
-----END PRIVATE KEY-----
";
    pub const KEY_B64: &str = "BBYULGZLU_le8uPEI_BvlEXfD1q7FLI6TmEmQ-k0iHU";
    /// `openssl ec -pubout -outform DER | tail -c 65`, base64url.
    const PUBLIC: &str = "BJ9Tbmpe8SnudkYp-3Kxw2JFlM_-IjhhdbxcIkTp0poN8maFvCYuFDrYVEozkzghBnmMf4mq1XDb_lmltpeZlWE";

    #[test]
    fn the_key_reads_from_each_form_openssl_writes() {
        for key in [KEY_SEC1, KEY_PKCS8, KEY_B64] {
            let vapid = Vapid::new(key, "mailto:ops@example.com").unwrap();
            assert_eq!(vapid.public_key(), PUBLIC);
        }
        for bad in ["", "not a key", "AAAA", "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----"] {
            assert!(Vapid::new(bad, "mailto:ops@example.com").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_subject_is_a_mailto_or_https_contact() {
        for good in ["mailto:ops@example.com", "https://orders.example.com/contact"] {
            assert!(Vapid::new(KEY_B64, good).is_ok(), "{good}");
        }
        for bad in ["ops@example.com", "mailto:", "http://orders.example.com", "https://"] {
            let err = Vapid::new(KEY_B64, bad).unwrap_err();
            assert!(err.to_string().contains("VAPID_SUBJECT"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_token_is_an_es256_jwt_for_the_endpoints_origin_signed_by_the_key_it_names() {
        let vapid = Vapid::new(KEY_SEC1, "mailto:ops@example.com").unwrap();
        let endpoint = url::Url::parse("https://push.example.net:8443/send/abc?x=1").unwrap();
        let header = vapid.authorization(&endpoint);
        let (token, k) = header.strip_prefix("vapid t=").unwrap().split_once(", k=").unwrap();
        assert_eq!(k, PUBLIC);
        let (input, signature) = token.rsplit_once('.').unwrap();
        let key = VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
        let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap()).unwrap();
        key.verify(input.as_bytes(), &signature).expect("signature verifies");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(input.split_once('.').unwrap().1).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example.net:8443", "the origin, port included");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let exp = claims["exp"].as_u64().unwrap();
        assert!(exp > now && exp <= now + 24 * 3600, "expires within a day: {exp}");
    }
}
