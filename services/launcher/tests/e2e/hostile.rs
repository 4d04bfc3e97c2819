//! Hostile input, generated: every public JSON body with strings holding
//! control characters, very long or arbitrary Unicode, and numbers at and
//! past every boundary (zero, negative, too many decimals, beyond `f64`,
//! beyond `i64`), sent through the gateway. Every answer is a 2xx, or a 4xx
//! with the error body; never a 5xx.

use crate::helpers::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// A JSON string literal that a client could send.
fn hostile_string() -> impl Strategy<Value = String> {
    let control = prop::char::range('\u{0}', '\u{9f}').prop_filter("a control character", |c| c.is_control());
    prop_oneof![
        ("[a-z0-9@.]{0,12}", control, "[a-z0-9@.]{0,12}").prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        // Long, yet every body stays under the 64 KiB limit (a larger one is
        // answered 413 before it is read, which `api.rs` tests).
        (any::<char>(), 200usize..2_000).prop_map(|(c, n)| c.to_string().repeat(n)),
        ".{0,64}",
        "[a-z0-9._%+-]{1,70}@[a-z0-9.\\[\\]:-]{1,70}",
        Just(String::new()),
    ]
    .prop_map(|s| serde_json::to_string(&s).expect("a string serializes"))
}

/// A JSON number's text (or something in its place).
fn hostile_number() -> impl Strategy<Value = String> {
    let boundaries = [
        "0",
        "-0",
        "0.0",
        "0.01",
        "0.001",
        "0.005",
        "1",
        "-1",
        "-0.01",
        "1.10",
        "1.100",
        "999999999999.99",
        "1000000000000",
        "99999999999999.99",
        "1e15",
        "1e308",
        "-1e308",
        "1e400",
        "-1e400",
        "1e-400",
        "2.2250738585072014e-308",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775809",
        "18446744073709551616",
        "123456789012345678901234567890.123456789",
        "\"600\"",
        "null",
        "true",
        "[]",
        "{}",
    ];
    prop_oneof![
        prop::sample::select(boundaries.to_vec()).prop_map(str::to_string),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| f.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        hostile_string(),
    ]
}

/// A request to one of the public operations that take a JSON body.
fn hostile_request() -> impl Strategy<Value = (Method, &'static str, String)> {
    let s = hostile_string;
    prop_oneof![
        (s(), s(), s(), s(), s()).prop_map(|(e, p, f, l, ph)| (
            Method::POST,
            "/identity/register",
            format!(r#"{{"email":{e},"password":{p},"firstName":{f},"lastName":{l},"phone":{ph}}}"#)
        )),
        (s(), s()).prop_map(|(e, p)| (Method::POST, "/identity/login", format!(r#"{{"email":{e},"password":{p}}}"#))),
        (s(), s(), s()).prop_map(|(f, l, ph)| (
            Method::PUT,
            "/identity/profile",
            format!(r#"{{"firstName":{f},"lastName":{l},"phone":{ph}}}"#)
        )),
        hostile_number().prop_map(|n| (Method::POST, "/ordering/orders", format!(r#"{{"price":{n}}}"#))),
        hostile_number().prop_map(|n| (Method::POST, "/billing/account/deposit", format!(r#"{{"amount":{n}}}"#))),
        hostile_number().prop_map(|n| (Method::POST, "/billing/account/withdraw", format!(r#"{{"amount":{n}}}"#))),
        (s(), s()).prop_map(|(k, v)| (Method::POST, "/ordering/orders", format!(r#"{{{k}:{v},"price":1}}"#))),
    ]
}

/// The status of `body` sent to `path`, and whether a 4xx came with the error body.
async fn send(app: &TestApp, user: &User, method: Method, path: &str, body: String) -> (StatusCode, Option<Value>) {
    let r = app
        .http
        .request(method, app.url(path))
        .bearer_auth(&user.token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("gateway answers");
    let status = r.status();
    (status, r.json::<Value>().await.ok())
}

#[test]
fn every_public_json_body_answers_2xx_or_4xx_whatever_its_strings_and_numbers_hold() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // No throttles: every request reaches its handler.
    let app = rt.block_on(TestApp::spawn_with(|c| {
        c.abuse.login_per_address_per_minute = 0;
        c.abuse.login_per_account_per_minute = 0;
        c.abuse.register_per_address_per_minute = 0;
        c.per_user = runtime::http::PerUserLimits {
            orders_per_user_per_minute: 0,
            deposits_per_user_per_minute: 0,
            withdrawals_per_user_per_minute: 0,
        };
    }));
    let user = rt.block_on(app.user());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(200);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let result = runner.run(&hostile_request(), |(method, path, body)| {
        let (status, answer) = rt.block_on(send(&app, &user, method.clone(), path, body.clone()));
        let shown: String = body.chars().take(200).collect();
        prop_assert!(!status.is_server_error(), "{method} {path} {shown:?} answered {status}: {answer:?}");
        if status.is_client_error() {
            let answer = answer.unwrap_or_default();
            prop_assert_eq!(&answer["code"], &Value::from(status.as_u16()), "{} {}: {}", method, path, answer);
            prop_assert!(answer["message"].is_string(), "{answer}");
        }
        Ok(())
    });
    rt.block_on(app.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}
