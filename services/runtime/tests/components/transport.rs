//! TLS to the broker and the database: `amqps://` through a TLS terminator on
//! loopback in front of the real RabbitMQ, and `sslmode` against the real
//! PostgreSQL (which speaks TLS) and against a server that does not.

use runtime::auth::tls::TestAuthority;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use test_support::Sandbox;
use tokio::net::{TcpListener, TcpStream};

/// Terminates TLS (the authority's server certificate for `localhost`) on a
/// loopback port and passes the bytes on to `upstream`: a broker with TLS.
struct TlsTerminator {
    port: u16,
    /// TLS handshakes completed.
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsTerminator {
    async fn start(authority: &TestAuthority, upstream: &'static str) -> TlsTerminator {
        let acceptor = test_support::tls::acceptor(authority);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = test_support::tls::serve_each(listener, Some(acceptor), move |mut tls| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut plain) = TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            }
        });
        TlsTerminator { port, handshakes, task }
    }
}

#[tokio::test]
async fn an_amqps_url_connects_to_the_broker_over_tls() {
    let authority = runtime::auth::tls::test_authority().unwrap();
    let terminator = TlsTerminator::start(&authority, "127.0.0.1:5672").await;
    let sandbox = Sandbox::new().await;
    let url = format!("amqps://guest:guest@localhost:{}/{}", terminator.port, sandbox.vhost());
    let broker = runtime::Broker::new(&url).with_ca(Some(authority.ca_pem.clone()));
    // A confirm channel: the connection is open, the topology declared.
    let channel = broker.confirm_channel().await.expect("connected over TLS");
    assert!(broker.is_connected());
    assert!(terminator.handshakes.load(Ordering::SeqCst) >= 1, "the connection went through TLS");
    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
}

#[tokio::test]
async fn an_amqps_broker_whose_certificate_is_not_trusted_is_refused() {
    let authority = runtime::auth::tls::test_authority().unwrap();
    let terminator = TlsTerminator::start(&authority, "127.0.0.1:5672").await;
    let sandbox = Sandbox::new().await;
    let url = format!("amqps://guest:guest@localhost:{}/{}", terminator.port, sandbox.vhost());
    // Only the public web roots: the test authority is not among them.
    let err = runtime::Broker::new(&url).channel().await.expect_err("refused");
    let message = format!("{err}").to_lowercase();
    assert!(message.contains("certificate") || message.contains("issuer"), "{err}");
    assert_eq!(terminator.handshakes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_amqps_url_to_a_plain_amqp_port_fails_instead_of_speaking_in_clear() {
    let sandbox = Sandbox::new().await;
    let url = format!("amqps://guest:guest@localhost:5672/{}", sandbox.vhost());
    let broker = runtime::Broker::with_timeout("test", url, std::time::Duration::from_secs(5));
    assert!(broker.channel().await.is_err());
}

#[tokio::test]
async fn a_database_url_with_sslmode_require_connects_over_tls() {
    let sandbox = Sandbox::without_broker();
    let url = format!("{}?sslmode=require", sandbox.database_url("tls"));
    let pool = runtime::data::db::connect_with(&url, 2, sqlx::migrate!("../../migrations/ordering")).await.unwrap();
    let ssl: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&pool).await.unwrap();
    assert!(ssl, "the connection is encrypted");
    pool.close().await;
}

#[tokio::test]
async fn sslmode_require_against_a_server_without_tls_is_a_clear_error() {
    // Answers PostgreSQL's SSLRequest with `N`: "no TLS here".
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut request = [0u8; 8];
            if tcp.read_exact(&mut request).await.is_ok() {
                let _ = tcp.write_all(b"N").await;
            }
        }
    });
    let url = format!("postgres://postgres:secret@127.0.0.1:{port}/orders?sslmode=require");
    let err = runtime::data::db::connect_with(&url, 1, sqlx::migrate!("../../migrations/ordering")).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("does not support TLS"), "{message}");
    assert!(message.contains("127.0.0.1") && message.contains("/orders"), "says which database: {message}");
    assert!(!message.contains("secret"), "the password is not shown: {message}");
    server.abort();
}
