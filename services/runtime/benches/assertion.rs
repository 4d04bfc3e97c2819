//! Benchmark (not a test): what the gateway's assertion costs per request,
//! signing (the gateway) and verifying (the service behind it).
//!
//!     cargo bench -p runtime --bench assertion
//!
//! Prints the mean time of each over many rounds, single-threaded. Each
//! assertion is verified once (a service refuses one it has seen), so the
//! verifying includes the memory of the ones seen.

use axum::http::{HeaderMap, HeaderValue, Method};
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
    const PATH: &str = "/api/v1/account";
    for _ in 0..1000 {
        std::hint::black_box(signer.sign("billing", &Method::GET, PATH, &user));
    }
    let started = Instant::now();
    let mut signed = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        signed.push(std::hint::black_box(signer.sign("billing", &Method::GET, PATH, &user)));
    }
    let sign = started.elapsed() / rounds;
    let requests: Vec<HeaderMap> = signed
        .iter()
        .map(|a| {
            let mut headers = HeaderMap::new();
            headers.insert(ASSERTION_HEADER, HeaderValue::from_str(a).unwrap());
            headers
        })
        .collect();
    let started = Instant::now();
    for headers in &requests {
        std::hint::black_box(verifier.verify(&Method::GET, PATH, headers).expect("valid"));
    }
    let verify = started.elapsed() / rounds;
    println!("assertion ({} bytes): sign {sign:?}, verify {verify:?} (mean of {rounds})", signed[0].len());
}
