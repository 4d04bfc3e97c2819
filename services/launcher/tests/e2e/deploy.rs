//! What running the production layout pod by pod found
//! (`scripts/rehearse-deploy`): in a rolling restart, a replica that shuts
//! down closes its keep-alive connections, one of them under a request the
//! gateway has just sent on it.

use crate::helpers::TestApp;
use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An "ordering" that closes a connection under the request it carries
/// (without an answer, as a replica ending its connections does): every
/// POST's, and the first GET's. Returns its URL and the GETs it has seen.
async fn closing_upstream() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let gets = Arc::new(AtomicUsize::new(0));
    let seen = gets.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let gets = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET ") && gets.fetch_add(1, Ordering::SeqCst) > 0 {
                    let body = br#"{"status":"pending"}"#;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(body).await;
                }
                // Otherwise dropped: closed under the request.
            });
        }
    });
    (url, gets)
}

#[tokio::test]
async fn a_connection_closed_under_a_get_is_retried_and_anything_else_is_a_503_to_retry() {
    let mut app = TestApp::spawn().await;
    let (ordering, gets) = closing_upstream().await;
    let gateway = app.gateway_to(&ordering, 5).await;
    let user = app.user().await;

    // A GET changes nothing: sent once more, on a fresh connection.
    let r = app
        .http
        .get(format!("{gateway}/api/v1/ordering/orders/{}", uuid::Uuid::new_v4()))
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(gets.load(Ordering::SeqCst), 2, "the GET was sent twice");

    // A POST may have been acted on: not repeated; the client is told to
    // try again (with its idempotency key), not given a 502.
    let r = app
        .http
        .post(format!("{gateway}/api/v1/ordering/orders"))
        .bearer_auth(&user.token)
        .json(&json!({"price": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], 503, "{body}");
    app.stop().await;
}
