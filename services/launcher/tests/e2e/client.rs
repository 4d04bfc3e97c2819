//! Talking to a test's system as its clients do: users, calls through the
//! gateway, event streams, raw messages into its vhost, its databases.

use crate::app::TestApp;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::time::Duration;
use test_support::eventually;
use test_support::sse::Event;
use tokio::sync::mpsc;
use uuid::Uuid;

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.gateway)
    }

    pub async fn call(
        &self,
        user: Option<&User>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self.http.request(method, self.url(path));
        if let Some(u) = user {
            req = req.bearer_auth(&u.token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("gateway answers")
    }

    pub async fn get<T: DeserializeOwned>(&self, user: &User, path: &str) -> T {
        let r = self.call(Some(user), Method::GET, path, None).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.expect("JSON body")
    }

    pub async fn post(&self, user: &User, path: &str, body: Value) -> reqwest::Response {
        self.call(Some(user), Method::POST, path, Some(body)).await
    }

    /// A POST under an `Idempotency-Key` (a retry sends the same key), as
    /// sent: the caller awaits it, or races several.
    pub fn post_with_key(
        &self,
        user: &User,
        path: &str,
        key: &str,
        body: Value,
    ) -> impl Future<Output = reqwest::Result<reqwest::Response>> + use<> {
        self.http.post(self.url(path)).bearer_auth(&user.token).header("Idempotency-Key", key).json(&body).send()
    }

    pub async fn register(&self, email: &str, password: &str) -> reqwest::Response {
        self.call(
            None,
            Method::POST,
            "/identity/register",
            Some(json!({"email": email, "password": password, "firstName": "Test", "lastName": "User"})),
        )
        .await
    }

    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.call(None, Method::POST, "/identity/login", Some(json!({"email": email, "password": password}))).await
    }

    /// A new user, registered and logged in.
    pub async fn user(&self) -> User {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let r = self.register(&email, "correct horse").await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let id: Uuid = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
        self.login_again(&User { id, email, token: String::new() }).await
    }

    /// `user` logged in again (with the password `user()` gave them): a fresh token.
    pub async fn login_again(&self, user: &User) -> User {
        let r = self.login(&user.email, "correct horse").await;
        assert_eq!(r.status(), StatusCode::OK);
        let token = r.json::<Value>().await.unwrap()["accessToken"].as_str().unwrap().to_string();
        User { id: user.id, email: user.email.clone(), token }
    }

    /// Deposits `amount` into the user's account.
    pub async fn deposit(&self, user: &User, amount: u32) {
        let r = self.post(user, "/billing/account/deposit", json!({"amount": amount})).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "a deposit of {amount}");
    }

    /// A new user (registered and logged in) with `amount` in their account.
    pub async fn user_with(&self, amount: u32) -> User {
        let user = self.user().await;
        self.deposit(&user, amount).await;
        user
    }

    /// Places an order of `price` for the user (accepted, pending): its id.
    pub async fn place_order(&self, user: &User, price: u32) -> String {
        let r = self.post(user, "/ordering/orders", json!({"price": price})).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED, "an order of {price}");
        r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
    }

    pub async fn balance(&self, user: &User) -> f64 {
        self.get::<Value>(user, "/billing/account").await["amount"].as_f64().unwrap()
    }

    /// Polls the order until it leaves `pending`.
    pub async fn settled_order(&self, user: &User, id: &str) -> Value {
        eventually(Duration::from_secs(20), || async {
            let order: Value = self.get(user, &format!("/ordering/orders/{id}")).await;
            (order["status"] != "pending").then_some(order)
        })
        .await
    }

    /// Opens the user's event stream through the gateway; events arrive on the receiver.
    pub async fn subscribe(&self, user: &User) -> mpsc::UnboundedReceiver<Event> {
        test_support::sse::events(
            self.http.get(self.url("/push/orders")).bearer_auth(&user.token).send().await.unwrap(),
        )
    }

    /// Publishes a raw message into the test's vhost, as a service would.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: Option<&str>,
        kind: &str,
        body: &[u8],
    ) {
        let conn = Connection::connect(&self.vhost.amqp_url, ConnectionProperties::default()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        let mut props = BasicProperties::default().with_type(kind.into()).with_content_type("application/json".into());
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(confirm, lapin::Confirmation::Ack(None)), "published and routed");
        let _ = conn.close(200, "done".into()).await;
    }
}

impl TestApp {
    /// Messages ready in a queue of the test's vhost (the broker's own count,
    /// not the management API's sampled statistics).
    pub async fn queue_depth(&self, queue: &str) -> i64 {
        i64::from(test_support::queue_depth(&self.vhost.amqp_url, queue).await)
    }

    /// Waits until `n` long polls of this app's orders are parked
    /// (`orders_long_polls_waiting` of its ordering database, whichever
    /// replica holds them): the signal that a poll waits, not a clock.
    pub async fn long_polls_waiting(&self, n: u32) {
        let series = format!("orders_long_polls_waiting{{database=\"{}_ordering\"}} ", self.prefix);
        let url = format!("{}/metrics", self.service_url("ordering"));
        eventually(Duration::from_secs(20), || async {
            let text = self.http.get(&url).send().await.ok()?.text().await.ok()?;
            let value: f64 = text.lines().find_map(|l| l.strip_prefix(&series))?.trim().parse().ok()?;
            (value == f64::from(n)).then_some(())
        })
        .await
    }

    /// A connection to one of the test's service databases.
    pub async fn db(&self, service: &str) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.sandbox.database_url(service)).await.unwrap()
    }
}

pub struct User {
    pub id: Uuid,
    pub email: String,
    pub token: String,
}

/// `user` as the gateway names it in an assertion (the token's id and
/// expiry matter only to logout, which tests make through the gateway).
pub fn as_current(user: &User) -> runtime::auth::CurrentUser {
    runtime::auth::CurrentUser {
        id: user.id,
        email: user.email.clone(),
        token_id: Uuid::new_v4(),
        token_expires: chrono::Utc::now().timestamp() + 3600,
    }
}

/// The header name the gateway's assertion travels in.
pub const ASSERTION: &str = runtime::auth::ASSERTION_HEADER;

/// Asserts the seed's error body: `{code, message}` with the response's status.
pub async fn assert_error(resp: reqwest::Response, status: StatusCode, needle: &str) {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.expect("error body is JSON");
    assert_eq!(body["code"], status.as_u16(), "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(message.to_lowercase().contains(&needle.to_lowercase()), "{message:?} should mention {needle:?}");
}

/// Waits until the service at `url` says it is ready (`/health/ready`).
pub async fn ready(http: &reqwest::Client, url: &str) {
    eventually(Duration::from_secs(30), || async {
        let r = http.get(format!("{url}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
}
