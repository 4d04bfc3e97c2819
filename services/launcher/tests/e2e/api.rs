//! The public API's contract: errors, authentication, and who sees what.

use crate::helpers::{ASSERTION, TestApp, User, assert_error};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn registration_and_login_errors_are_clear() {
    let app = TestApp::spawn().await;
    let email = "Someone@Example.com";
    assert_eq!(app.register(email, "long enough").await.status(), StatusCode::CREATED);
    assert_error(app.register("someone@example.com", "long enough").await, StatusCode::CONFLICT, "already registered")
        .await;
    assert_error(app.register("not-an-email", "long enough").await, StatusCode::UNPROCESSABLE_ENTITY, "e-mail").await;
    assert_error(app.register("x@example.com", "short").await, StatusCode::UNPROCESSABLE_ENTITY, "at least 8").await;

    // A wrong password and an unknown e-mail get the same answer.
    let wrong = app.login(email, "wrong password").await;
    assert_error(wrong, StatusCode::UNAUTHORIZED, "wrong e-mail or password").await;
    let unknown = app.login("nobody@example.com", "long enough").await;
    assert_error(unknown, StatusCode::UNAUTHORIZED, "wrong e-mail or password").await;

    let r = app.login("someone@example.com", "long enough").await;
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("accessToken=") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let token = r.json::<Value>().await.unwrap()["accessToken"].as_str().unwrap().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_the_error_body() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let raw = |path: &str, body: &'static str| {
        app.http
            .post(app.url(path))
            .bearer_auth(&user.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_error(raw("/ordering/orders", "{not json").await.unwrap(), StatusCode::BAD_REQUEST, "malformed JSON").await;
    assert_error(
        raw("/ordering/orders", "{}").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing field `price`",
    )
    .await;
    assert_error(
        raw("/ordering/orders", r#"{"price":"600"}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "positive number",
    )
    .await;
    assert_error(
        raw("/ordering/orders", r#"{"price":0}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "greater than zero",
    )
    .await;
    assert_error(
        raw("/ordering/orders", r#"{"price":-3}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "greater than zero",
    )
    .await;
    assert_error(
        raw("/ordering/orders", r#"{"price":1.005}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "two decimal places",
    )
    .await;
    assert_error(
        raw("/billing/account/deposit", r#"{"amount":1e20}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "must not exceed",
    )
    .await;
    assert_error(
        raw("/billing/account/deposit", "[]").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid request body",
    )
    .await;
    let no_type = app
        .http
        .post(app.url("/billing/account/deposit"))
        .bearer_auth(&user.token)
        .body(r#"{"amount":1}"#)
        .send()
        .await
        .unwrap();
    assert_error(no_type, StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json").await;
    let huge = format!(r#"{{"price":1,"pad":"{}"}}"#, "x".repeat(100_000));
    let r = app
        .http
        .post(app.url("/ordering/orders"))
        .bearer_auth(&user.token)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "larger than").await;

    assert_error(
        app.call(Some(&user), Method::GET, "/ordering/orders/not-a-uuid", None).await,
        StatusCode::BAD_REQUEST,
        "invalid",
    )
    .await;
    let unknown = format!("/ordering/orders/{}", uuid::Uuid::new_v4());
    assert_error(app.call(Some(&user), Method::GET, &unknown, None).await, StatusCode::NOT_FOUND, "order not found")
        .await;
    assert_error(app.call(Some(&user), Method::GET, "/nowhere", None).await, StatusCode::NOT_FOUND, "no such resource")
        .await;
    assert_error(
        app.call(Some(&user), Method::DELETE, "/billing/account", None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "not allowed",
    )
    .await;

    // Withdrawing more than the balance.
    app.post(&user, "/billing/account/deposit", json!({"amount": 12.5})).await;
    assert_error(
        app.post(&user, "/billing/account/withdraw", json!({"amount": 12.51})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not enough money",
    )
    .await;
    assert_eq!(
        app.post(&user, "/billing/account/withdraw", json!({"amount": 2.25})).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.balance(&user).await, 10.25);
    app.stop().await;
}

#[tokio::test]
async fn tokens_forged_headers_cookies_and_logout() {
    let app = TestApp::spawn().await;
    let user = app.user().await;

    // A client cannot speak for a user by sending a user id, nor even a
    // valid assertion of the gateway's: only a token counts here.
    let forged = app
        .http
        .get(app.url("/billing/account"))
        .header("X-User-Id", user.id.to_string())
        .header("X-User-Email", &user.email)
        .header(ASSERTION, app.assertion("billing", reqwest::Method::GET, "/api/v1/account", &user))
        .send()
        .await
        .unwrap();
    assert_error(forged, StatusCode::UNAUTHORIZED, "authentication required").await;
    let bad =
        app.http.get(app.url("/billing/account")).bearer_auth("eyJhbGciOiJFZERTQSJ9.e30.c2ln").send().await.unwrap();
    assert_error(bad, StatusCode::UNAUTHORIZED, "invalid").await;
    // Nor override their own identity: the token wins over a forged header.
    let other = User { id: uuid::Uuid::new_v4(), email: "other@example.com".into(), token: String::new() };
    let r = app
        .http
        .get(app.url("/identity/profile"))
        .bearer_auth(&user.token)
        .header("X-User-Id", other.id.to_string())
        .header(ASSERTION, app.assertion("identity", reqwest::Method::GET, "/api/v1/profile", &other))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["id"], user.id.to_string());

    // Every answer carries a request id: the client's own, or a new one.
    let r = app
        .http
        .get(app.url("/identity/profile"))
        .bearer_auth(&user.token)
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    let r = app.http.get(app.url("/identity/profile")).bearer_auth(&user.token).send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"].len(), 36, "a UUID");

    // The cookie authenticates as well as the header does.
    let r = app
        .http
        .get(app.url("/identity/profile"))
        .header("cookie", format!("theme=dark; accessToken={}", user.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let profile: Value = r.json().await.unwrap();
    assert_eq!(profile["email"], user.email.as_str());
    assert_eq!(profile["firstName"], "Test");

    let r = app
        .http
        .put(app.url("/identity/profile"))
        .bearer_auth(&user.token)
        .json(&json!({"firstName": "Julie", "lastName": "Doe", "phone": "+71004242424"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["firstName"], "Julie");

    // After logout the token is refused.
    let r = app.call(Some(&user), Method::POST, "/identity/logout", None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_error(
        app.call(Some(&user), Method::GET, "/billing/account", None).await,
        StatusCode::UNAUTHORIZED,
        "revoked",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn users_cannot_see_each_others_orders_account_or_notifications() {
    let app = TestApp::spawn().await;
    let alice = app.user().await;
    let bob = app.user().await;
    app.deposit(&alice, 100).await;
    let order = app.place_order(&alice, 30).await;
    app.settled_order(&alice, &order).await;
    crate::helpers::eventually(std::time::Duration::from_secs(10), || async {
        let n: Vec<Value> = app.get(&alice, "/notifications").await;
        (!n.is_empty()).then_some(())
    })
    .await;

    assert_error(
        app.call(Some(&bob), Method::GET, &format!("/ordering/orders/{order}"), None).await,
        StatusCode::NOT_FOUND,
        "order not found",
    )
    .await;
    assert!(app.get::<Vec<Value>>(&bob, "/ordering/orders").await.is_empty());
    assert!(app.get::<Vec<Value>>(&bob, "/notifications").await.is_empty());
    assert_eq!(app.balance(&bob).await, 0.0);
    assert_eq!(app.balance(&alice).await, 70.0);
    app.stop().await;
}

#[tokio::test]
async fn an_order_request_sent_again_with_its_idempotency_key_places_one_order() {
    let app = TestApp::spawn().await;
    let user = app.user_with(100).await;
    let place =
        |key: &'static str, price: u32| app.post_with_key(&user, "/ordering/orders", key, json!({"price": price}));
    let (first, again) = tokio::join!(place("checkout-7f3a", 30), place("checkout-7f3a", 30));
    let (first, again) = (first.unwrap(), again.unwrap());
    assert_eq!((first.status(), again.status()), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    let id = first.json::<Value>().await.unwrap()["id"].clone();
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id, "the same order");
    app.settled_order(&user, id.as_str().unwrap()).await;
    let later = place("checkout-7f3a", 30).await.unwrap();
    assert_eq!(later.json::<Value>().await.unwrap()["status"], "succeeded", "the order as it is now");

    assert_error(place("checkout-7f3a", 31).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "another price").await;
    assert_error(place("", 1).await.unwrap(), StatusCode::BAD_REQUEST, "Idempotency-Key").await;

    assert_eq!(app.get::<Vec<Value>>(&user, "/ordering/orders").await.len(), 1);
    assert_eq!(app.balance(&user).await, 70.0, "charged once");
    app.stop().await;
}

#[tokio::test]
async fn order_lists_come_in_pages_newest_first() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let mut placed = Vec::new();
    for price in [1, 2, 3] {
        placed.push(app.place_order(&user, price).await);
    }
    let first: Vec<Value> = app.get(&user, "/ordering/orders?limit=2").await;
    assert_eq!(first.iter().map(|o| o["id"].as_str().unwrap()).collect::<Vec<_>>(), [&placed[2], &placed[1]]);
    let last = first[1]["id"].as_str().unwrap();
    let rest: Vec<Value> = app.get(&user, &format!("/ordering/orders?limit=2&before={last}")).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["id"], placed[0].as_str());

    assert_error(
        app.call(Some(&user), Method::GET, "/ordering/orders?limit=0", None).await,
        StatusCode::BAD_REQUEST,
        "limit",
    )
    .await;
    assert_error(
        app.call(Some(&user), Method::GET, "/notifications?limit=many", None).await,
        StatusCode::BAD_REQUEST,
        "invalid query",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn control_characters_in_any_text_field_are_a_422_not_a_500() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    // NUL reached PostgreSQL from a login e-mail (a 500); every field and
    // every control character is refused before any handler sees it.
    let send = |path: &'static str, method: Method, body: Value| {
        let mut req = app.http.request(method, app.url(path)).json(&body);
        if !path.starts_with("/identity/log") && !path.starts_with("/identity/reg") {
            req = req.bearer_auth(&user.token);
        }
        req.send()
    };
    for (path, method, body, field) in [
        ("/identity/login", Method::POST, json!({"email": "a\u{0}b@example.com", "password": "x12345678"}), "email"),
        ("/identity/login", Method::POST, json!({"email": user.email, "password": "x1234\u{0}5678"}), "password"),
        ("/identity/register", Method::POST, json!({"email": "a\u{7}@example.com", "password": "x12345678"}), "email"),
        (
            "/identity/register",
            Method::POST,
            json!({"email": "ok@example.com", "password": "x12345678", "firstName": "A\u{1b}[31m"}),
            "firstName",
        ),
        ("/identity/profile", Method::PUT, json!({"lastName": "line\nbreak"}), "lastName"),
        ("/identity/profile", Method::PUT, json!({"phone": "+7\u{0}100"}), "phone"),
        (
            "/identity/register",
            Method::POST,
            json!({"email": "ok@example.com", "password": "x1234\u{85}5678"}),
            "password",
        ),
    ] {
        let r = send(path, method.clone(), body.clone()).await.unwrap();
        assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, &format!("{field} must not contain control characters"))
            .await;
    }
    // A number sent as text with a NUL is no number; a field the API does
    // not have is ignored, whatever it holds.
    let r = send("/billing/account/deposit", Method::POST, json!({"amount": "1\u{0}"})).await.unwrap();
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid request body").await;
    let r = send("/ordering/orders", Method::POST, json!({"price": 1, "note\u{0}": "\u{0}"})).await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    app.stop().await;
}

#[tokio::test]
async fn address_literals_single_label_domains_and_overlong_addresses_do_not_register() {
    let app = TestApp::spawn().await;
    let long_local = format!("{}@example.com", "a".repeat(65));
    for email in ["x@[127.0.0.1]", "x@[IPv6:::1]", "root@localhost", "a@intranet", "a@10.0.0.1", long_local.as_str()] {
        assert_error(app.register(email, "long enough").await, StatusCode::UNPROCESSABLE_ENTITY, "e-mail").await;
    }
    assert_eq!(app.register("a@mail.example.org", "long enough").await.status(), StatusCode::CREATED);
    app.stop().await;
}

#[tokio::test]
async fn a_clients_own_request_id_reaches_the_ledger_only_as_a_short_safe_token() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let deposit = |id: String| {
        app.http
            .post(app.url("/billing/account/deposit"))
            .bearer_auth(&user.token)
            .header("x-request-id", id)
            .json(&json!({"amount": 1}))
            .send()
    };
    let hostile = format!("<script>{}</script>", "x".repeat(4000));
    let r = deposit(hostile.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let replaced = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "replaced by a new id: {replaced}");
    let r = deposit("client-trace:42".into()).await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-trace:42", "a safe id is kept");

    let billing = app.db("billing").await;
    let sources: Vec<String> = sqlx::query_scalar("SELECT source FROM ledger_entries WHERE user_id = $1 ORDER BY id")
        .bind(user.id)
        .fetch_all(&billing)
        .await
        .unwrap();
    assert_eq!(sources, [format!("request:{replaced}"), "request:client-trace:42".to_string()]);
    app.stop().await;
}
