//! Tools to make a dependency go away inside a test without touching the
//! machine's PostgreSQL or RabbitMQ: a TCP proxy that can be cut (connections
//! reset, new ones refused) or stalled (bytes held, nothing answered), a
//! listener that accepts and never answers, and a guard that drops a test's
//! databases and vhost even when the test fails.

use crate::helpers::{clean_up_blocking, create_vhost, postgres_url};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow.
    Open,
    /// Connections are reset and new ones closed at once (a server that is down).
    Cut,
    /// Connections stay open but no byte moves (a server that hangs).
    Stalled,
}

/// A TCP proxy to `upstream` on a random loopback port.
pub struct TcpProxy {
    pub port: u16,
    state: watch::Sender<Link>,
    /// Connections refused while the link was cut.
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// The `host:port` a postgres:// or amqp:// URL points at (the scheme's
/// default port when it names none).
pub fn authority(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host_port = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, a)| a);
    if host_port.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
        return host_port.to_string();
    }
    let port = match scheme {
        "amqp" => 5672,
        "amqps" => 5671,
        _ => 5432,
    };
    format!("{host_port}:{port}")
}

impl TcpProxy {
    /// A proxy to the server `url` points at (the tests' PostgreSQL or
    /// RabbitMQ, as `TEST_POSTGRES_URL` / `TEST_AMQP_BASE` say).
    pub async fn before(url: &str) -> TcpProxy {
        TcpProxy::start(&authority(url)).await
    }

    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, watch) = watch::channel(Link::Open);
        let upstream = upstream.to_string();
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = refused.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if *watch.borrow() == Link::Cut {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                tokio::spawn(pipe(client, upstream.clone(), watch.clone()));
            }
        });
        TcpProxy { port, state, refused, task }
    }

    /// How many connections the proxy refused while cut: the client's
    /// attempts to reach a server that is down.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set(&self, link: Link) {
        self.state.send_replace(link);
    }

    /// `url` (a postgres:// or amqp:// URL) pointed at the proxy instead of
    /// its server.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (head, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let credentials = head.rsplit_once('@').map(|(c, _)| format!("{c}@")).unwrap_or_default();
        format!("{scheme}://{credentials}127.0.0.1:{}{tail}", self.port)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.state.send_replace(Link::Cut);
        self.task.abort();
    }
}

async fn pipe(mut client: TcpStream, upstream: String, mut watch: watch::Receiver<Link>) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut a = [0u8; 16384];
    let mut b = [0u8; 16384];
    loop {
        let link = *watch.borrow_and_update();
        match link {
            Link::Cut => return,
            Link::Stalled => {
                if watch.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Link::Open => {}
        }
        tokio::select! {
            _ = watch.changed() => {}
            n = cr.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if *watch.borrow() != Link::Cut && sw.write_all(&a[..n]).await.is_err() { return },
            },
            n = sr.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if *watch.borrow() != Link::Cut && cw.write_all(&b[..n]).await.is_err() { return },
            },
        }
    }
}

/// Accepts TCP connections and never sends a byte: a hung server.
pub struct SilentListener {
    pub port: u16,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentListener {
    pub async fn start() -> SilentListener {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        SilentListener { port, accepted, task }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test's own databases and vhost, dropped when the guard is, pass or fail.
pub struct Sandbox {
    pub prefix: String,
    pub amqp_url: String,
    databases: std::sync::Mutex<Vec<String>>,
}

impl Sandbox {
    pub async fn new() -> Sandbox {
        runtime::telemetry::init_for_tests();
        let prefix = format!("r{}", &Uuid::new_v4().simple().to_string()[..12]);
        // Guarded before the vhost is asked for: a slow broker may create it after a client timeout.
        let mut sandbox = Sandbox { prefix: prefix.clone(), amqp_url: String::new(), databases: Default::default() };
        sandbox.amqp_url = create_vhost(&prefix).await.amqp_url;
        sandbox
    }

    /// Databases only; services get a broker URL that refuses connections.
    pub async fn without_broker() -> Sandbox {
        runtime::telemetry::init_for_tests();
        let prefix = format!("r{}", &Uuid::new_v4().simple().to_string()[..12]);
        Sandbox { prefix, amqp_url: "amqp://guest:guest@127.0.0.1:1/%2f".into(), databases: Default::default() }
    }

    /// The URL of the test's database `name` (created by the service that uses it).
    pub fn database_url(&self, name: &str) -> String {
        let db = format!("{}_{name}", self.prefix);
        self.databases.lock().unwrap().push(db.clone());
        format!("{}/{db}", postgres_url())
    }

    /// Lowers the delivery limit of the sandbox's queues matching `pattern`
    /// to `limit` with an operator policy (as RabbitMQ 4 gives every quorum
    /// queue a limit of 20 by default; an operator policy applies beside the
    /// queue's arguments and user policies, the lowest limit winning), and
    /// waits until `queue` shows it.
    pub async fn lower_delivery_limit(&self, pattern: &str, limit: u32, queue: &str) {
        let http = reqwest::Client::new();
        let api = crate::helpers::rabbitmq_api();
        let r = http
            .put(format!("{api}/operator-policies/{}/delivery-limit", self.prefix))
            .json(
                &serde_json::json!({"pattern": pattern, "definition": {"delivery-limit": limit}, "apply-to": "queues"}),
            )
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "setting the policy: {}", r.status());
        crate::helpers::eventually(std::time::Duration::from_secs(20), || async {
            let q: serde_json::Value =
                http.get(format!("{api}/queues/{}/{queue}", self.prefix)).send().await.ok()?.json().await.ok()?;
            (q["operator_policy"] == "delivery-limit").then_some(())
        })
        .await;
    }

    /// The database URL as seen through `proxy` (see [`TcpProxy::before`]).
    pub fn proxied_database_url(&self, name: &str, proxy: &TcpProxy) -> String {
        proxy.url(&self.database_url(name))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let databases = std::mem::take(&mut *self.databases.lock().unwrap());
        clean_up_blocking(databases, Some(self.prefix.clone()), None);
    }
}

#[tokio::test]
async fn a_proxy_url_keeps_everything_but_the_server() {
    assert_eq!(authority("amqp://guest:guest@10.0.0.7:5673/%2f"), "10.0.0.7:5673");
    assert_eq!(authority("amqp://guest:guest@rabbit/v"), "rabbit:5672");
    assert_eq!(authority("postgres://postgres@127.0.0.1:5432"), "127.0.0.1:5432");
    let proxy = TcpProxy::before("amqp://guest:guest@10.0.0.7:5673/r1").await;
    let p = proxy.port;
    assert_eq!(proxy.url("amqp://guest:guest@10.0.0.7:5673/r1"), format!("amqp://guest:guest@127.0.0.1:{p}/r1"));
    assert_eq!(proxy.url("postgres://postgres@db:5432/x_y"), format!("postgres://postgres@127.0.0.1:{p}/x_y"));
    assert_eq!(proxy.url("postgres://db"), format!("postgres://127.0.0.1:{p}"));
}
