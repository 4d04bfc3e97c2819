//! The tests' own servers (an SMTP sink, a TLS terminator in front of a
//! broker): each connection on a task of its own, over TLS with a
//! certificate from a test authority when asked.

use runtime::auth::tls::TestAuthority;
use std::sync::Arc;

/// An acceptor that presents `authority`'s certificate (for `localhost` and
/// 127.0.0.1), which a client trusts by the authority's CA.
pub fn acceptor(authority: &TestAuthority) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(authority.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("the authority's certificate");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(authority.key_pem.as_bytes()).expect("its key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("a certificate that fits its key");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A connection a test server serves: TCP, or TLS over it.
pub trait Connection: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Connection for T {}

/// Serves each connection `listener` accepts with `handle`, on a task of its
/// own, over TLS when `tls` is given (a failed handshake drops the
/// connection). The connections end with the returned task (abort it).
pub fn serve_each<F, Fut>(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Box<dyn Connection>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, handle) = (tls.clone(), handle.clone());
            connections.spawn(async move {
                let connection: Box<dyn Connection> = match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => Box::new(stream),
                        Err(_) => return,
                    },
                    None => Box::new(tcp),
                };
                handle(connection).await;
            });
        }
    })
}
