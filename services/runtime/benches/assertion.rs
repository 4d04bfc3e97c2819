//! Benchmark (not a test): what the gateway's assertion costs per request,
//! signing (the gateway) and verifying (the service behind it).
//!
//!     cargo bench -p runtime --bench assertion
//!
//! Prints the mean time of each over many rounds, single-threaded.

use axum::http::{HeaderMap, HeaderValue};
use runtime::auth::{ASSERTION_HEADER, AssertionSigner, CallerVerifier, CurrentUser};
use std::time::Instant;

fn main() {
    let rounds = 20_000u32;
    let signer = AssertionSigner::generate();
    let verifier = CallerVerifier::new(signer.verify_keys(), "billing");
    let user = CurrentUser {
        id: uuid::Uuid::new_v4(),
        email: "someone@example.com".into(),
        token_id: uuid::Uuid::new_v4(),
        token_expires: chrono::Utc::now().timestamp() + 3600,
    };
    // Warm up.
    for _ in 0..1000 {
        std::hint::black_box(signer.sign("billing", &user));
    }
    let started = Instant::now();
    let mut last = String::new();
    for _ in 0..rounds {
        last = std::hint::black_box(signer.sign("billing", &user));
    }
    let sign = started.elapsed() / rounds;
    let mut headers = HeaderMap::new();
    headers.insert(ASSERTION_HEADER, HeaderValue::from_str(&last).unwrap());
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(verifier.verify(&headers).expect("valid"));
    }
    let verify = started.elapsed() / rounds;
    println!("assertion ({} bytes): sign {sign:?}, verify {verify:?} (mean of {rounds})", last.len());
}
