//! Web Push end to end, against a push service of the tests' own (`PushPeer`)
//! that implements the receiving side of the RFCs: it checks the VAPID token
//! (RFC 8292: an ES256 JWT signed by the key named in `k=`, for its own
//! origin, not expired) and the RFC 8030 headers, and decrypts the
//! `aes128gcm` payload (RFC 8291) with the subscription's private key, as the
//! browser would, with p256, hkdf and aes-gcm directly (not the sender's
//! crate). The notification service is the real one, with Web Push turned on.

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use contracts::messages::{Message, OrderCreated, exchange};
use contracts::topology::NOTIFICATION_ORDERS;
use hkdf::Hkdf;
use p256::ecdsa::signature::Verifier;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::*;

/// A VAPID key for the tests (`openssl ecparam -genkey -name prime256v1 -noout`).
const VAPID_PEM: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIAQWFCxmS1P5XvLjxCPwb5RF3w9auxSyOk5hJkPpNIh1oAoGCCqGSM49
AwEHoUQDQgAEn1Nual7xKe52Rin7crHDYkWUz/4iOGF1vFwiROnSmg3yZoW8Ji4U
OthUSjOTOCEGeYx/iarVcNv+WaW2l5mVYQ==
-----END EC PRIVATE KEY-----
";

/// One push message as the peer received it.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    /// What the peer answered.
    status: u16,
    /// The decrypted payload, when it decrypted.
    payload: Option<Value>,
    /// Why the peer refused it or could not decrypt it.
    problem: Option<String>,
    ttl: Option<u64>,
    urgency: Option<String>,
    topic: Option<String>,
}

/// A browser, as far as the push service is concerned: its key pair and
/// auth secret (what `PushSubscription.toJSON()` reveals of them is public).
struct Browser {
    secret: p256::SecretKey,
    auth: [u8; 16],
    /// The `applicationServerKey` it subscribed with; a push signed with
    /// another key is refused (403), as FCM and Mozilla's autopush do.
    server_key: Option<String>,
}

#[derive(Default)]
struct PeerState {
    browsers: HashMap<String, Browser>,
    /// Answers to give a channel before accepting (status, Retry-After).
    script: HashMap<String, VecDeque<(u16, Option<u64>)>>,
    received: HashMap<String, Vec<Received>>,
}

struct PushPeer {
    origin: String,
    ca_file: PathBuf,
    state: Arc<Mutex<PeerState>>,
    shutdown: CancellationToken,
    dir: PathBuf,
}

impl Drop for PushPeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PushPeer {
    async fn start() -> PushPeer {
        let authority = runtime::auth::tls::test_authority().unwrap();
        let dir = std::env::temp_dir().join(format!("order-system-push-peer-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_file, cert_file, key_file) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&ca_file, &authority.ca_pem).unwrap();
        std::fs::write(&cert_file, &authority.cert_pem).unwrap();
        std::fs::write(&key_file, &authority.key_pem).unwrap();
        let tls = runtime::auth::tls::server_config(&runtime::auth::tls::TlsConfig {
            cert_file: Some(cert_file),
            key_file: Some(key_file),
        })
        .await
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let origin = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(PeerState::default()));
        let router = axum::Router::new()
            .route("/push/{channel}", axum::routing::post(receive))
            .with_state((state.clone(), origin.clone()));
        let shutdown = CancellationToken::new();
        tokio::spawn(runtime::auth::tls::serve_tls(listener, router, tls, shutdown.clone(), Duration::ZERO));
        PushPeer { origin, ca_file, state, shutdown, dir }
    }

    /// A new browser's subscription, as the page posts it, whose keys the
    /// peer keeps to decrypt what is pushed to it.
    fn browser(&self, server_key: Option<&str>) -> (String, Value) {
        let channel = Uuid::new_v4().simple().to_string();
        let secret = p256::SecretKey::random(&mut OsRng);
        let auth: [u8; 16] = rand_bytes();
        let subscription = json!({
            "endpoint": format!("{}/push/{channel}", self.origin),
            "expirationTime": null,
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes()),
                "auth": URL_SAFE_NO_PAD.encode(auth),
            },
        });
        let browser = Browser { secret, auth, server_key: server_key.map(str::to_string) };
        self.state.lock().unwrap().browsers.insert(channel.clone(), browser);
        (channel, subscription)
    }

    /// The peer answers the channel's next pushes so, before it accepts one.
    fn answer_next(&self, channel: &str, status: u16, retry_after: Option<u64>) {
        self.state.lock().unwrap().script.entry(channel.to_string()).or_default().push_back((status, retry_after));
    }

    fn received(&self, channel: &str) -> Vec<Received> {
        self.state.lock().unwrap().received.get(channel).cloned().unwrap_or_default()
    }

    /// The messages accepted for `channel` once there are `n` of them.
    async fn accepted(&self, channel: &str, n: usize) -> Vec<Received> {
        eventually(Duration::from_secs(30), || async {
            let accepted: Vec<_> = self.received(channel).into_iter().filter(|r| r.status == 201).collect();
            (accepted.len() >= n).then_some(accepted)
        })
        .await
    }
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// The push service's `POST /push/{channel}` (RFC 8030 §5).
async fn receive(
    State((state, origin)): State<(Arc<Mutex<PeerState>>, String)>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut state = state.lock().unwrap();
    let mut record = Received {
        at: Instant::now(),
        status: 201,
        payload: None,
        problem: None,
        ttl: header("ttl").and_then(|t| t.parse().ok()),
        urgency: header("urgency"),
        topic: header("topic"),
    };
    let verdict = (|| {
        let Some(browser) = state.browsers.get(&channel) else {
            return Err((StatusCode::NOT_FOUND, "no such subscription".to_string()));
        };
        let k = check_vapid(header("authorization").as_deref(), &origin)
            .map_err(|e| (StatusCode::UNAUTHORIZED, format!("VAPID: {e}")))?;
        if browser.server_key.as_ref().is_some_and(|expected| *expected != k) {
            return Err((StatusCode::FORBIDDEN, "VAPID key is not the one the subscription was made with".into()));
        }
        if record.ttl.is_none() {
            return Err((StatusCode::BAD_REQUEST, "TTL is required (RFC 8030 §5.2)".into()));
        }
        if !matches!(record.urgency.as_deref(), None | Some("very-low" | "low" | "normal" | "high")) {
            return Err((StatusCode::BAD_REQUEST, "bad Urgency".into()));
        }
        if header("content-encoding").as_deref() != Some("aes128gcm") {
            return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Encoding must be aes128gcm".into()));
        }
        Ok(())
    })();
    let scripted = state.script.get_mut(&channel).and_then(VecDeque::pop_front);
    let response = match (verdict, scripted) {
        (Err((status, problem)), _) => {
            record.status = status.as_u16();
            record.problem = Some(problem.clone());
            (status, problem).into_response()
        }
        (Ok(()), Some((status, retry_after))) => {
            record.status = status;
            let mut response = StatusCode::from_u16(status).unwrap().into_response();
            if let Some(secs) = retry_after {
                response.headers_mut().insert("retry-after", secs.into());
            }
            response
        }
        (Ok(()), None) => {
            // A push service takes what it cannot read; the browser then
            // decrypts it, or drops it when it cannot.
            let browser = &state.browsers[&channel];
            match decrypt(&body, &browser.secret, &browser.auth) {
                Ok(plain) => record.payload = serde_json::from_slice(&plain).ok(),
                Err(e) => record.problem = Some(format!("undecryptable: {e}")),
            }
            (StatusCode::CREATED, [("location", format!("{origin}/message/{}", Uuid::new_v4()))]).into_response()
        }
    };
    state.received.entry(channel).or_default().push(record);
    response
}

/// Checks `vapid t=<JWT>, k=<key>` (RFC 8292 §3): an ES256 JWT signed by `k`,
/// for `origin`, expiring within a day. The key, when it holds.
fn check_vapid(header: Option<&str>, origin: &str) -> Result<String, String> {
    let params = header.and_then(|h| h.strip_prefix("vapid ")).ok_or("no `vapid` Authorization")?;
    let mut token = None;
    let mut key = None;
    for param in params.split(',') {
        match param.trim().split_once('=') {
            Some(("t", v)) => token = Some(v.to_string()),
            Some(("k", v)) => key = Some(v.to_string()),
            _ => {}
        }
    }
    let (token, k) = (token.ok_or("no t=")?, key.ok_or("no k=")?);
    let public = URL_SAFE_NO_PAD.decode(&k).map_err(|e| format!("k: {e}"))?;
    let public = p256::ecdsa::VerifyingKey::from_sec1_bytes(&public).map_err(|e| format!("k: {e}"))?;
    let (input, signature) = token.rsplit_once('.').ok_or("t is not a JWT")?;
    let (header, claims) = input.split_once('.').ok_or("t is not a JWT")?;
    let decode = |part: &str| -> Result<Value, String> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
    };
    if decode(header)?["alg"] != "ES256" {
        return Err("alg is not ES256".into());
    }
    let signature = p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    public.verify(input.as_bytes(), &signature).map_err(|_| "signature does not verify with k")?;
    let claims = decode(claims)?;
    if claims["aud"] != origin {
        return Err(format!("aud {} is not {origin}", claims["aud"]));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let exp = claims["exp"].as_u64().ok_or("no exp")?;
    if exp <= now || exp > now + 24 * 3600 {
        return Err(format!("exp {exp} is not within the next 24 hours"));
    }
    let sub = claims["sub"].as_str().unwrap_or_default();
    if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
        return Err(format!("sub {sub:?}"));
    }
    Ok(k)
}

/// RFC 8291 §3.4 and RFC 8188 §2: one `aes128gcm` record, decrypted with the
/// user agent's private key and auth secret.
fn decrypt(body: &[u8], ua_secret: &p256::SecretKey, auth: &[u8; 16]) -> Result<Vec<u8>, String> {
    if body.len() < 21 {
        return Err("shorter than the aes128gcm header".into());
    }
    let salt = &body[..16];
    let record_size = u32::from_be_bytes(body[16..20].try_into().unwrap()) as usize;
    let id_len = body[20] as usize;
    let as_public = body.get(21..21 + id_len).ok_or("key id cut short")?;
    let ciphertext = &body[21 + id_len..];
    if ciphertext.len() > record_size {
        return Err("more than one record".into());
    }
    let as_public = p256::PublicKey::from_sec1_bytes(as_public).map_err(|e| format!("key id: {e}"))?;
    let shared = p256::ecdh::diffie_hellman(ua_secret.to_nonzero_scalar(), as_public.as_affine());
    let ua_public = ua_secret.public_key().to_encoded_point(false);
    let key_info =
        [b"WebPush: info\0".as_slice(), ua_public.as_bytes(), as_public.to_encoded_point(false).as_bytes()].concat();
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), shared.raw_secret_bytes()).expand(&key_info, &mut ikm).unwrap();
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek).unwrap();
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce).unwrap();
    let mut plain = Aes128Gcm::new_from_slice(&cek)
        .unwrap()
        .decrypt(Nonce::from_slice(&nonce), ciphertext)
        .map_err(|_| "AES-GCM authentication failed (keys do not match)")?;
    // The last record's padding: a 2 delimiter, then zeros.
    while plain.last() == Some(&0) {
        plain.pop();
    }
    if plain.pop() != Some(2) {
        return Err("no last-record delimiter".into());
    }
    Ok(plain)
}

/// The notification service with Web Push on, beside the test app's own
/// (both consume the same queues into the same database), and a gateway to it.
struct WebPushService {
    config: notification::Config,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    shutdown: CancellationToken,
    gateway: String,
}

impl WebPushService {
    async fn start(app: &mut TestApp, peer: &PushPeer, tweak: impl FnOnce(&mut notification::WebPushConfig)) -> Self {
        let mut web_push = notification::WebPushConfig {
            vapid_private_key: Some(VAPID_PEM.into()),
            vapid_subject: Some("mailto:ops@example.com".into()),
            allowed_hosts: vec!["127.0.0.1".into()],
            ca_file: Some(peer.ca_file.clone()),
            retry_base_ms: 200,
            ..Default::default()
        };
        tweak(&mut web_push);
        let mut system = app.config.clone();
        system.web_push = web_push;
        system.messaging.outbox_poll_ms = 100;
        system.mail.emails_per_recipient_per_hour = 0;
        let config = system.notification(&app.wiring);
        let (task, shutdown, url) = Self::spawn(&config).await;
        let gateway = app.gateway_with(|c| c.notification_url = url).await;
        WebPushService { config, task, shutdown, gateway }
    }

    async fn spawn(
        config: &notification::Config,
    ) -> (tokio::task::JoinHandle<anyhow::Result<()>>, CancellationToken, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(notification::run(config.clone(), listener, shutdown.clone()));
        crate::client::ready(&reqwest::Client::new(), &url).await;
        (task, shutdown, url)
    }

    /// Stops the service (as SIGTERM would) and starts it again on the same
    /// database and queues. Its new URL (the gateway keeps the old one).
    async fn restart(&mut self) -> String {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "stopped cleanly: {stopped:?}");
        let (task, shutdown, url) = Self::spawn(&self.config).await;
        (self.task, self.shutdown) = (task, shutdown);
        url
    }

    async fn call(
        &self,
        app: &TestApp,
        user: &User,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = app.http.request(method, format!("{}/api/v1{path}", self.gateway)).bearer_auth(&user.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    }

    async fn subscribe(&self, app: &TestApp, user: &User, subscription: &Value) -> reqwest::Response {
        self.call(app, user, Method::POST, "/notifications/push-subscriptions", Some(subscription.clone())).await
    }
}

impl Drop for WebPushService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A user with money, subscribed from a new browser: (user, channel).
async fn subscribed_user(app: &TestApp, service: &WebPushService, peer: &PushPeer, deposit: u32) -> (User, String) {
    let user = app.user().await;
    if deposit > 0 {
        app.deposit(&user, deposit).await;
    }
    let (channel, subscription) = peer.browser(None);
    let r = service.subscribe(app, &user, &subscription).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{}", r.text().await.unwrap());
    (user, channel)
}

async fn order(app: &TestApp, user: &User, price: u32) -> Value {
    let id = app.place_order(user, price).await;
    app.settled_order(user, &id).await
}

#[tokio::test]
async fn a_settled_order_reaches_the_subscribed_browser_signed_and_encrypted() {
    let mut app = TestApp::spawn().await;
    let peer = PushPeer::start().await;
    let service = WebPushService::start(&mut app, &peer, |_| {}).await;
    let (user, channel) = subscribed_user(&app, &service, &peer, 1000).await;

    // The key the page subscribes with is the one the pushes are signed with.
    let r = service.call(&app, &user, Method::GET, "/notifications/push-public-key", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let key = r.json::<Value>().await.unwrap()["publicKey"].as_str().unwrap().to_string();
    assert_eq!(URL_SAFE_NO_PAD.decode(&key).unwrap().len(), 65);

    let succeeded = order(&app, &user, 600).await;
    assert_eq!(succeeded["status"], "succeeded");
    let pushed = peer.accepted(&channel, 1).await;
    let payload = pushed[0].payload.as_ref().unwrap_or_else(|| panic!("decrypted: {:?}", pushed[0].problem));
    assert_eq!(payload["orderId"], succeeded["id"]);
    assert!(payload["body"].as_str().unwrap().contains("successfully processed"), "{payload}");
    assert_eq!(pushed[0].urgency.as_deref(), Some("normal"));
    let ttl = pushed[0].ttl.unwrap();
    assert!(ttl > 86_000 && ttl <= 86_400, "TTL: what is left of a day: {ttl}");
    let notification_id: Uuid = payload["notificationId"].as_str().unwrap().parse().unwrap();
    assert_eq!(pushed[0].topic.as_deref(), Some(notification_id.simple().to_string().as_str()));

    // The outcome of a failed order too.
    let failed = order(&app, &user, 500).await;
    assert_eq!(failed["status"], "failed");
    let pushed = peer.accepted(&channel, 2).await;
    let payload = pushed[1].payload.as_ref().unwrap();
    assert_eq!(payload["orderId"], failed["id"]);
    assert!(payload["body"].as_str().unwrap().contains("not fulfilled"), "{payload}");

    // Unsubscribed: the next outcome is stored and listed, and not pushed.
    let endpoint = format!("{}/push/{channel}", peer.origin);
    let r = service
        .call(&app, &user, Method::DELETE, "/notifications/push-subscriptions", Some(json!({"endpoint": endpoint})))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = service
        .call(&app, &user, Method::DELETE, "/notifications/push-subscriptions", Some(json!({"endpoint": endpoint})))
        .await;
    assert_error(r, StatusCode::NOT_FOUND, "no push subscription").await;
    let third = order(&app, &user, 100).await;
    let db = app.db("notification").await;
    eventually_counts(
        Duration::from_secs(20),
        &db,
        "SELECT count(*) FROM notifications WHERE order_id = $1",
        third["id"].as_str().unwrap().parse::<Uuid>().unwrap(),
        1,
    )
    .await;
    let queued = test_support::count(&db, "SELECT count(*) FROM push_deliveries WHERE user_id = $1", user.id).await;
    // The subscription's messages went with it, and none was queued since.
    assert_eq!(queued, 0, "nothing queued for the third order");
    assert_eq!(peer.received(&channel).len(), 2);
    drop(service);
    app.stop().await;
}

#[tokio::test]
async fn a_503_is_retried_after_the_push_services_retry_after() {
    let mut app = TestApp::spawn().await;
    let peer = PushPeer::start().await;
    let service = WebPushService::start(&mut app, &peer, |_| {}).await;
    let (user, channel) = subscribed_user(&app, &service, &peer, 1000).await;
    peer.answer_next(&channel, 503, Some(2));
    peer.answer_next(&channel, 429, None);

    order(&app, &user, 100).await;
    let pushed = peer.accepted(&channel, 1).await;
    assert!(pushed[0].payload.is_some());
    let tries = peer.received(&channel);
    assert_eq!(tries.iter().map(|t| t.status).collect::<Vec<_>>(), [503, 429, 201]);
    let waited = tries[1].at - tries[0].at;
    assert!(waited >= Duration::from_secs(2), "Retry-After: 2 was honoured: {waited:?}");
    // Without Retry-After: the configured backoff (200 ms, then 400 ms).
    assert!(tries[2].at - tries[1].at >= Duration::from_millis(200));
    let db = app.db("notification").await;
    let (attempts, status, error): (i32, Option<i32>, Option<String>) =
        sqlx::query_as("SELECT attempts, sent_status, last_error FROM push_deliveries WHERE user_id = $1")
            .bind(user.id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((attempts, status), (3, Some(201)));
    assert!(error.unwrap().contains("429"));
    drop(service);
    app.stop().await;
}

#[tokio::test]
async fn a_subscription_answered_410_is_removed() {
    let mut app = TestApp::spawn().await;
    let peer = PushPeer::start().await;
    let service = WebPushService::start(&mut app, &peer, |_| {}).await;
    let (user, gone) = subscribed_user(&app, &service, &peer, 1000).await;
    let (kept, subscription) = peer.browser(None);
    assert_eq!(service.subscribe(&app, &user, &subscription).await.status(), StatusCode::NO_CONTENT);
    peer.answer_next(&gone, 410, None);

    order(&app, &user, 100).await;
    peer.accepted(&kept, 1).await;
    let db = app.db("notification").await;
    let endpoint = format!("{}/push/{gone}", peer.origin);
    eventually_counts(
        Duration::from_secs(20),
        &db,
        "SELECT count(*) FROM push_subscriptions WHERE endpoint = $1",
        endpoint,
        0,
    )
    .await;
    let left = test_support::count(&db, "SELECT count(*) FROM push_subscriptions WHERE user_id = $1", user.id).await;
    assert_eq!(left, 1, "the other browser's subscription stays");

    // The next outcome goes to the remaining browser only.
    order(&app, &user, 100).await;
    peer.accepted(&kept, 2).await;
    assert_eq!(peer.received(&gone).len(), 1, "the removed subscription is not tried again");
    // The metrics say so (the process's registry: other tests count too).
    let metrics = app.http.get(format!("{}/metrics", app.gateway)).send().await.unwrap().text().await.unwrap();
    for series in ["web_push_sent_total ", "web_push_subscriptions_removed_total "] {
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series}in\n{metrics}"));
        assert!(value >= 1.0, "{series}{value}");
    }
    drop(service);
    app.stop().await;
}

#[tokio::test]
async fn keys_that_do_not_match_are_refused_or_end_the_delivery_without_retries() {
    let mut app = TestApp::spawn().await;
    let peer = PushPeer::start().await;
    let service = WebPushService::start(&mut app, &peer, |c| c.subscriptions_per_user = 3).await;
    let user = app.user_with(1000).await;

    // What the service can check itself is refused at once (422).
    let (_, good) = peer.browser(None);
    let mut bad = good.clone();
    bad["keys"]["p256dh"] = json!(URL_SAFE_NO_PAD.encode([[4u8].as_slice(), &[7u8; 64]].concat()));
    assert_error(service.subscribe(&app, &user, &bad).await, StatusCode::UNPROCESSABLE_ENTITY, "keys.p256dh").await;
    let mut bad = good.clone();
    bad["keys"]["auth"] = json!("c2hvcnQ");
    assert_error(service.subscribe(&app, &user, &bad).await, StatusCode::UNPROCESSABLE_ENTITY, "keys.auth").await;
    let mut bad = good.clone();
    bad["endpoint"] = json!(bad["endpoint"].as_str().unwrap().replace("https:", "http:"));
    assert_error(service.subscribe(&app, &user, &bad).await, StatusCode::UNPROCESSABLE_ENTITY, "https").await;
    let mut bad = good.clone();
    bad["endpoint"] = json!("https://metadata.internal/push/x");
    assert_error(service.subscribe(&app, &user, &bad).await, StatusCode::UNPROCESSABLE_ENTITY, "not a push service")
        .await;

    // Keys of another browser: the push service takes the message (it cannot
    // read it), the browser cannot decrypt it. The delivery is done, once.
    let (wrong_keys, mut subscription) = peer.browser(None);
    let (_, other) = peer.browser(None);
    subscription["keys"] = other["keys"].clone();
    assert_eq!(service.subscribe(&app, &user, &subscription).await.status(), StatusCode::NO_CONTENT);
    // Made with another server key: the push service refuses ours (403).
    let (wrong_server, subscription) = peer.browser(Some("BOtherServerKey"));
    assert_eq!(service.subscribe(&app, &user, &subscription).await.status(), StatusCode::NO_CONTENT);
    let (right, subscription) = peer.browser(None);
    assert_eq!(service.subscribe(&app, &user, &subscription).await.status(), StatusCode::NO_CONTENT);

    order(&app, &user, 100).await;
    peer.accepted(&right, 1).await;
    let undecryptable = peer.accepted(&wrong_keys, 1).await;
    assert!(undecryptable[0].payload.is_none());
    assert!(undecryptable[0].problem.as_deref().unwrap().contains("undecryptable"), "{undecryptable:?}");
    let db = app.db("notification").await;
    let refused_endpoint = format!("{}/push/{wrong_server}", peer.origin);
    let (attempts, reason): (i32, String) = eventually(Duration::from_secs(20), || async {
        sqlx::query_as(
            "SELECT d.attempts, d.failed_reason FROM push_deliveries d JOIN push_subscriptions s ON s.id = d.subscription_id
             WHERE s.endpoint = $1 AND d.failed_at IS NOT NULL",
        )
        .bind(&refused_endpoint)
        .fetch_optional(&db)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(attempts, 1, "a 403 is not retried");
    assert!(reason.contains("403"), "{reason}");
    assert_eq!(peer.received(&wrong_server).iter().map(|r| r.status).collect::<Vec<_>>(), [403]);
    let subscriptions =
        test_support::count(&db, "SELECT count(*) FROM push_subscriptions WHERE user_id = $1", user.id).await;
    assert_eq!(subscriptions, 3, "a refusal is not a removal");

    // A fourth browser replaces the oldest (the cap is 3).
    let (_, subscription) = peer.browser(None);
    assert_eq!(service.subscribe(&app, &user, &subscription).await.status(), StatusCode::NO_CONTENT);
    let endpoints: Vec<String> = sqlx::query_scalar("SELECT endpoint FROM push_subscriptions WHERE user_id = $1")
        .bind(user.id)
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(endpoints.len(), 3);
    assert!(!endpoints.contains(&format!("{}/push/{wrong_keys}", peer.origin)), "the oldest went: {endpoints:?}");
    drop(service);
    app.stop().await;
}

#[tokio::test]
async fn nothing_is_pushed_twice_after_a_restart_and_a_redelivered_order_event() {
    let mut app = TestApp::spawn().await;
    let peer = PushPeer::start().await;
    let mut service = WebPushService::start(&mut app, &peer, |_| {}).await;
    let (user, channel) = subscribed_user(&app, &service, &peer, 0).await;

    // An order event as ordering publishes it, then the same message again
    // after the notification service restarted: what a consumer killed
    // between its commit and its ack gets redelivered.
    let event = OrderCreated {
        order_id: Uuid::new_v4(),
        user_id: user.id,
        price: "42".parse().unwrap(),
        occurred_at: chrono::Utc::now(),
    };
    let body = serde_json::to_vec(&event).unwrap();
    let message_id = Uuid::new_v4().to_string();
    app.publish_raw(exchange::ORDERING, OrderCreated::NAME, Some(&message_id), OrderCreated::NAME, &body).await;
    let first = peer.accepted(&channel, 1).await;
    assert_eq!(first[0].payload.as_ref().unwrap()["orderId"], json!(event.order_id));

    service.restart().await;
    app.publish_raw(exchange::ORDERING, OrderCreated::NAME, Some(&message_id), OrderCreated::NAME, &body).await;
    // A later event is pushed after the restart: the pusher runs again...
    let later = OrderCreated { order_id: Uuid::new_v4(), ..event.clone() };
    let later_body = serde_json::to_vec(&later).unwrap();
    let later_id = Uuid::new_v4().to_string();
    app.publish_raw(exchange::ORDERING, OrderCreated::NAME, Some(&later_id), OrderCreated::NAME, &later_body).await;
    peer.accepted(&channel, 2).await;
    // ...and the redelivered one has been handled (both consumers drained the queue).
    eventually(Duration::from_secs(20), || async {
        (app.queue_depth(NOTIFICATION_ORDERS.name).await == 0).then_some(())
    })
    .await;
    let db = app.db("notification").await;
    let notifications =
        test_support::count(&db, "SELECT count(*) FROM notifications WHERE order_id = $1", event.order_id).await;
    assert_eq!(notifications, 1);
    let per_order = |order: Uuid| {
        peer.received(&channel)
            .iter()
            .filter(|r| r.payload.as_ref().is_some_and(|p| p["orderId"] == json!(order)))
            .count()
    };
    assert_eq!(per_order(event.order_id), 1, "pushed once");
    assert_eq!(per_order(later.order_id), 1);
    drop(service);
    app.stop().await;
}

#[tokio::test]
async fn the_users_push_budget_caps_the_messages_an_hour() {
    let mut app = TestApp::spawn().await;
    let peer = PushPeer::start().await;
    let service = WebPushService::start(&mut app, &peer, |c| c.per_user_per_hour = 2).await;
    let (user, channel) = subscribed_user(&app, &service, &peer, 0).await;
    for _ in 0..3 {
        let event = OrderCreated {
            order_id: Uuid::new_v4(),
            user_id: user.id,
            price: "1".parse().unwrap(),
            occurred_at: chrono::Utc::now(),
        };
        let body = serde_json::to_vec(&event).unwrap();
        let id = Uuid::new_v4().to_string();
        app.publish_raw(exchange::ORDERING, OrderCreated::NAME, Some(&id), OrderCreated::NAME, &body).await;
    }
    let db = app.db("notification").await;
    eventually_counts(
        Duration::from_secs(20),
        &db,
        "SELECT count(*) FROM push_deliveries WHERE user_id = $1 AND suppressed_at IS NOT NULL",
        user.id,
        1,
    )
    .await;
    eventually_counts(
        Duration::from_secs(20),
        &db,
        "SELECT count(*) FROM push_deliveries WHERE user_id = $1 AND sent_at IS NOT NULL",
        user.id,
        2,
    )
    .await;
    assert_eq!(peer.received(&channel).len(), 2);
    let listed: Vec<Value> = app.get(&user, "/notifications").await;
    assert_eq!(listed.len(), 3, "every notification is still stored and listed");
    drop(service);
    app.stop().await;
}

#[tokio::test]
async fn without_a_vapid_key_web_push_is_off() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let r = app.call(Some(&user), Method::GET, "/notifications/push-public-key", None).await;
    assert_error(r, StatusCode::NOT_FOUND, "not enabled").await;
    let subscription =
        json!({"endpoint": "https://fcm.googleapis.com/fcm/send/x", "keys": {"p256dh": "x", "auth": "y"}});
    let r = app.call(Some(&user), Method::POST, "/notifications/push-subscriptions", Some(subscription)).await;
    assert_error(r, StatusCode::NOT_FOUND, "not enabled").await;
    let r = app.call(None, Method::GET, "/notifications/push-public-key", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn the_page_serves_its_service_worker_and_its_opt_in_button() {
    let app = TestApp::spawn().await;
    for (path, needle) in [("/sw.js", "showNotification"), ("/webpush.js", "pushManager.subscribe")] {
        let r = app.http.get(format!("{}{path}", app.gateway)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], "text/javascript; charset=utf-8", "{path}");
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    let page = app.http.get(&app.gateway).send().await.unwrap().text().await.unwrap();
    assert!(page.contains(r#"<script src="/webpush.js" defer></script>"#));
    assert!(page.contains(r#"id="push-toggle""#));
    app.stop().await;
}
