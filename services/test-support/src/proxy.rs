//! Making a dependency go away inside a test without touching the machine's
//! servers: a TCP proxy in front of it that can be cut (open connections
//! closed, new ones refused) or stalled (connections held, no byte moves),
//! and a listener that accepts and never answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow.
    Open,
    /// Connections are closed and new ones refused at once (a server that is down).
    Cut,
    /// Connections stay open but no byte moves (a server that hangs).
    Stalled,
}

/// A TCP proxy to an upstream `host:port` on a random loopback port.
pub struct TcpProxy {
    pub port: u16,
    state: watch::Sender<Link>,
    /// Connections refused while the link was cut.
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// The `host:port` a URL points at (postgres://, amqp://, http://; the
/// scheme's default port when it names none).
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
        "http" => 80,
        "https" => 443,
        _ => 5432,
    };
    format!("{host_port}:{port}")
}

impl TcpProxy {
    /// A proxy to the server `url` points at (a PostgreSQL, RabbitMQ or
    /// HTTP server); [`TcpProxy::url`] gives the URL through the proxy.
    pub async fn before(url: &str) -> TcpProxy {
        TcpProxy::start(&authority(url)).await
    }

    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, watch) = watch::channel(Link::Open);
        let upstream = upstream.to_string();
        let refused = Arc::new(AtomicU64::new(0));
        let counted = refused.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if *watch.borrow() == Link::Cut {
                    counted.fetch_add(1, Ordering::SeqCst);
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
        self.refused.load(Ordering::SeqCst)
    }

    pub fn set(&self, link: Link) {
        self.state.send_replace(link);
    }

    /// `url` pointed at the proxy instead of its server (scheme, credentials,
    /// path and query kept).
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
    accepted: Arc<AtomicUsize>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An upstream that echoes every byte back.
    async fn echo() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> std::io::Result<[u8; 4]> {
        stream.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).await?;
        Ok(got)
    }

    #[test]
    fn a_proxy_url_keeps_everything_but_the_server() {
        assert_eq!(authority("amqp://guest:guest@10.0.0.7:5673/%2f"), "10.0.0.7:5673");
        assert_eq!(authority("amqp://guest:guest@rabbit/v"), "rabbit:5672");
        assert_eq!(authority("postgres://postgres@127.0.0.1:5432"), "127.0.0.1:5432");
        assert_eq!(authority("http://127.0.0.1:8080"), "127.0.0.1:8080");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let proxy = TcpProxy::before("amqp://guest:guest@10.0.0.7:5673/r1").await;
            let p = proxy.port;
            assert_eq!(
                proxy.url("amqp://guest:guest@10.0.0.7:5673/r1"),
                format!("amqp://guest:guest@127.0.0.1:{p}/r1")
            );
            assert_eq!(proxy.url("postgres://postgres@db:5432/x_y"), format!("postgres://postgres@127.0.0.1:{p}/x_y"));
            assert_eq!(proxy.url("postgres://db"), format!("postgres://127.0.0.1:{p}"));
        });
    }

    #[tokio::test]
    async fn a_cut_closes_open_connections_refuses_new_ones_and_a_restore_lets_them_through() {
        let proxy = TcpProxy::start(&echo().await).await;
        let mut open = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        assert_eq!(&round_trip(&mut open).await.unwrap(), b"ping");

        proxy.set(Link::Cut);
        let mut rest = Vec::new();
        // The open connection ends (EOF or reset): it does not hang.
        let _ = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await.expect("closed");
        let mut refused = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        assert!(round_trip(&mut refused).await.is_err(), "a new connection is closed at once");
        crate::eventually(Duration::from_secs(5), || async { (proxy.refused() >= 1).then_some(()) }).await;

        proxy.set(Link::Open);
        let mut again = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        assert_eq!(&round_trip(&mut again).await.unwrap(), b"ping");
    }

    #[tokio::test]
    async fn a_stalled_link_holds_bytes_until_it_opens_again() {
        let proxy = TcpProxy::start(&echo().await).await;
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        assert_eq!(&round_trip(&mut stream).await.unwrap(), b"ping");
        proxy.set(Link::Stalled);
        let held = tokio::time::timeout(Duration::from_millis(300), round_trip(&mut stream)).await;
        assert!(held.is_err(), "no answer through a stalled link");
        proxy.set(Link::Open);
        // The bytes written while stalled now go through (the read resumes).
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn a_silent_listener_accepts_and_never_answers() {
        let silent = SilentListener::start().await;
        let mut stream = TcpStream::connect(("127.0.0.1", silent.port)).await.unwrap();
        crate::eventually(Duration::from_secs(5), || async { (silent.accepted() == 1).then_some(()) }).await;
        let mut byte = [0u8; 1];
        assert!(tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await.is_err());
    }
}
