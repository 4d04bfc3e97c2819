//! Slow and idle clients at the gateway (`runtime::http::connections`): a client
//! that trickles its requests holds at most its share of the connections
//! and permits, for a bounded time, and everyone else keeps getting answers.

use crate::helpers::{TestApp, eventually};
use reqwest::StatusCode;
use runtime::http::connections::ConnectionLimits;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// The headers of a login whose 64-byte body has not come yet, and its first byte.
const SLOW_LOGIN: &str = "POST /api/v1/identity/login HTTP/1.1\r\nHost: gateway\r\n\
    Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{";

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// A connection to `gateway` from the loopback address `source`.
async fn connect_from(source: &str, gateway: &str) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(addr_of(gateway)).await
}

/// The gateway's `gateway_client_requests_in_progress` gauge.
async fn requests_in_progress(http: &reqwest::Client, gateway: &str) -> usize {
    let text = http.get(format!("{gateway}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("gateway_client_requests_in_progress "))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as usize)
}

/// The status line's code of what `conn` answers, `None` when it closes first.
async fn answer(conn: &mut TcpStream) -> Option<u16> {
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).await.ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split(' ').nth(1)?.parse().ok()
}

#[tokio::test]
async fn many_clients_trickling_logins_hold_only_their_share_and_others_keep_getting_answers() {
    let mut app = TestApp::spawn().await;
    let bystander = app.user().await;
    // A gateway with 64 permits; a client address gets 32 connections and
    // 16 requests in progress. The slow requests wait long on their bodies.
    let gateway = app
        .gateway_with(|c| {
            c.limits.max_concurrent_requests = 64;
            c.limits.request_timeout_ms = 120_000;
            c.connections = ConnectionLimits {
                max_connections_per_client: 32,
                max_requests_per_client: 16,
                body_read_timeout_ms: 120_000,
                ..Default::default()
            };
        })
        .await;

    // 200 connections from another address each send a login's headers and
    // the first byte of its body, then nothing more.
    const SLOW: usize = 200;
    let (closed, refused, other) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let (closed, refused, other, gateway) = (closed.clone(), refused.clone(), other.clone(), gateway.clone());
        slow.push(tokio::spawn(async move {
            let Ok(mut conn) = connect_from("127.0.0.2", &gateway).await else {
                return closed.fetch_add(1, Ordering::SeqCst);
            };
            if conn.write_all(SLOW_LOGIN.as_bytes()).await.is_err() {
                return closed.fetch_add(1, Ordering::SeqCst);
            }
            match answer(&mut conn).await {
                None => closed.fetch_add(1, Ordering::SeqCst),
                Some(429) => refused.fetch_add(1, Ordering::SeqCst),
                Some(_) => other.fetch_add(1, Ordering::SeqCst),
            };
            // Holds the connection until the test ends.
            std::future::pending::<usize>().await
        }));
    }
    // Every slow request is answered, closed, or holds a permit in the gateway.
    let held = eventually(WAIT, || async {
        let held = requests_in_progress(&app.http, &gateway).await;
        let answered = closed.load(Ordering::SeqCst) + refused.load(Ordering::SeqCst) + other.load(Ordering::SeqCst);
        (held + answered == SLOW).then_some(held)
    })
    .await;

    // Meanwhile, a client from another address is answered every time.
    for _ in 0..8 {
        let r = app.http.get(format!("{gateway}/api/v1/billing/account")).bearer_auth(&bystander.token).send().await;
        assert_eq!(r.unwrap().status(), StatusCode::OK);
        let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
        let register = serde_json::json!({"email": email, "password": "correct horse"});
        let r = app.http.post(format!("{gateway}/api/v1/identity/register")).json(&register).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // The slow address held its share of the permits, no more; requests past
    // it were refused with 429 (and their connections closed, their bodies
    // unread), and connections past its share closed at once.
    assert_eq!(held, 16);
    assert_eq!(other.load(Ordering::SeqCst), 0);
    assert!(refused.load(Ordering::SeqCst) >= 16, "{refused:?}");
    assert!(closed.load(Ordering::SeqCst) > 0, "no connection was refused");
    for task in slow {
        task.abort();
    }
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_408_and_frees_its_permit() {
    let mut app = TestApp::spawn().await;
    let gateway = app
        .gateway_with(|c| c.connections = ConnectionLimits { body_read_timeout_ms: 500, ..Default::default() })
        .await;
    let mut conn = connect_from("127.0.0.2", &gateway).await.unwrap();
    conn.write_all(SLOW_LOGIN.as_bytes()).await.unwrap();
    let status = tokio::time::timeout(WAIT, answer(&mut conn)).await.expect("answered");
    assert_eq!(status, Some(408));
    eventually(WAIT, || async { (requests_in_progress(&app.http, &gateway).await == 0).then_some(()) }).await;
    app.stop().await;
}

/// Reads `conn` until the gateway closes it; what it sent before.
async fn until_closed(conn: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut got)).await.expect("the gateway closed the connection").ok();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_connection_that_does_not_send_its_headers_in_time_is_closed() {
    let mut app = TestApp::spawn().await;
    let gateway = app
        .gateway_with(|c| c.connections = ConnectionLimits { header_read_timeout_ms: 300, ..Default::default() })
        .await;
    // Half a request's headers, and nothing at all.
    let mut half = connect_from("127.0.0.2", &gateway).await.unwrap();
    half.write_all(b"GET /health/live HTTP/1.1\r\nHost: gateway\r\n").await.unwrap();
    let mut silent = connect_from("127.0.0.2", &gateway).await.unwrap();
    until_closed(&mut half).await;
    until_closed(&mut silent).await;
    app.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let mut app = TestApp::spawn().await;
    let gateway = app
        .gateway_with(|c| {
            c.connections =
                ConnectionLimits { idle_timeout_secs: 1, header_read_timeout_ms: 120_000, ..Default::default() }
        })
        .await;
    let mut conn = connect_from("127.0.0.2", &gateway).await.unwrap();
    conn.write_all(b"GET /health/live HTTP/1.1\r\nHost: gateway\r\n\r\n").await.unwrap();
    // Answered, kept alive, then closed once idle.
    let got = until_closed(&mut conn).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    app.stop().await;
}

#[tokio::test]
async fn http2_limits_streams_per_connection_and_the_size_of_a_header_list() {
    let mut app = TestApp::spawn().await;
    let gateway = app
        .gateway_with(|c| {
            c.connections = ConnectionLimits {
                h2_max_concurrent_streams: 7,
                h2_max_header_list_size: 8 * 1024,
                ..Default::default()
            }
        })
        .await;
    // HTTP/2 by prior knowledge (h2c), as the cleartext port speaks it.
    let tcp = connect_from("127.0.0.2", &gateway).await.unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut client = client.ready().await.unwrap();
    let get = |extra: Option<String>| {
        let mut req = axum::http::Request::get(format!("{gateway}/health/live"));
        if let Some(value) = extra {
            req = req.header("x-padding", value);
        }
        req.body(()).unwrap()
    };
    // A request whose headers fit is answered, and the connection has told
    // the client how many streams it may open at once.
    let (answer, _) = client.send_request(get(None), true).unwrap();
    let resp = tokio::select! {
        r = answer => r.unwrap(),
        _ = &mut conn => panic!("the connection ended"),
    };
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(conn.max_concurrent_send_streams(), 7);
    // One whose header list is larger than allowed is refused.
    let mut client = client.ready().await.unwrap();
    let (answer, _) = client.send_request(get(Some("x".repeat(16 * 1024))), true).unwrap();
    let refused = tokio::select! {
        r = answer => r.map(|r| r.status()),
        _ = &mut conn => panic!("the connection ended"),
    };
    assert!(matches!(refused, Ok(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)) || refused.is_err(), "{refused:?}");
    app.stop().await;
}

/// One HTTP/2 frame: its 9-byte header (length, type, flags, stream) and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// `GET /health/live` as an HPACK block of static-table names only, so the
/// frames can be written by hand: a hostile client does not use a library.
fn h2_get_live(stream: u32) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    block.extend([0x04, 12]); // :path, a literal not indexed
    block.extend(b"/health/live");
    block.extend([0x01, 7]); // :authority
    block.extend(b"gateway");
    h2_frame(HEADERS, 0x4 | 0x1, stream, &block) // END_HEADERS | END_STREAM
}

/// Opens an h2c connection, writes `requests` in one go and reads frames
/// until the connection ends or `until` matches one; returns every frame
/// read as (type, stream, payload).
async fn h2_exchange(gateway: &str, requests: Vec<u8>, until: impl Fn(u8, u32) -> bool) -> Vec<(u8, u32, Vec<u8>)> {
    let mut conn = connect_from("127.0.0.2", gateway).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    out.extend(requests);
    conn.write_all(&out).await.unwrap();
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(WAIT, conn.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return frames, // closed, reset or silent
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            if kind == SETTINGS && flags & 0x1 == 0 {
                conn.write_all(&h2_frame(SETTINGS, 0x1, 0, &[])).await.unwrap(); // ACK
            }
            let done = until(kind, stream);
            frames.push((kind, stream, payload));
            if done {
                return frames;
            }
        }
    }
}

#[tokio::test]
async fn a_rapid_reset_flood_ends_the_connection_and_fewer_resets_do_not() {
    let mut app = TestApp::spawn().await;
    let gateway =
        app.gateway_with(|c| c.connections = ConnectionLimits { h2_max_pending_resets: 5, ..Default::default() }).await;
    // Each request opened and at once cancelled (RST_STREAM CANCEL), before
    // the server could take it up: the "rapid reset" attack.
    let opened_and_reset = |streams: std::ops::Range<u32>| {
        streams
            .flat_map(|i| {
                let id = 2 * i + 1;
                let mut pair = h2_get_live(id);
                pair.extend(h2_frame(RST_STREAM, 0, id, &0x8u32.to_be_bytes()));
                pair
            })
            .collect::<Vec<u8>>()
    };
    let goaway = |frames: &[(u8, u32, Vec<u8>)]| {
        frames.iter().find(|(kind, ..)| *kind == GOAWAY).map(|(_, _, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
    };
    // Fewer than the limit: the connection goes on and answers the next request.
    let mut requests = opened_and_reset(0..4);
    requests.extend(h2_get_live(9));
    let frames = h2_exchange(&gateway, requests, |kind, stream| kind == HEADERS && stream == 9).await;
    assert_eq!(goaway(&frames), None, "{frames:?}");
    assert!(frames.iter().any(|(kind, stream, _)| *kind == HEADERS && *stream == 9), "{frames:?}");
    // Past it (and below hyper's own default of 20, so that the setting is
    // what is tested): the server ends the connection with ENHANCE_YOUR_CALM.
    let mut requests = opened_and_reset(0..10);
    requests.extend(h2_get_live(21));
    let frames = h2_exchange(&gateway, requests, |kind, _| kind == GOAWAY).await;
    assert_eq!(goaway(&frames), Some(ENHANCE_YOUR_CALM), "{frames:?}");
    assert!(!frames.iter().any(|(kind, stream, _)| *kind == HEADERS && *stream == 21), "{frames:?}");
    app.stop().await;
}
