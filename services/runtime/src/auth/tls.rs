//! HTTPS with HTTP/2: a service router served over rustls with ALPN `h2` and
//! `http/1.1`, from a configured certificate or, when none is configured, a
//! self-signed development certificate for `localhost` and `127.0.0.1`
//! generated at start. (The cleartext listeners of `http::serve` already speak
//! HTTP/1.1 and prior-knowledge HTTP/2, h2c, on the same port.)

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where a service's certificate comes from.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsConfig {
    /// PEM certificate chain for HTTPS (with --tls-key). Without both, a
    /// self-signed development certificate for localhost is generated at start.
    #[arg(long = "tls-cert", env = "TLS_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = "TLS_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

/// A self-signed certificate for local development: (certificate PEM, key PEM).
pub fn development_certificate() -> anyhow::Result<(String, String)> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    Ok((cert.pem(), signing_key.serialize_pem()))
}

/// A certificate authority and a server certificate it issued, all PEM: for
/// tests of the TLS clients (SMTP, AMQP, PostgreSQL) against a server on
/// loopback that trusts only this authority.
pub struct TestAuthority {
    /// The authority's own certificate: what a client is told to trust.
    pub ca_pem: String,
    /// The server's certificate, for `localhost`, `127.0.0.1` and `::1`.
    pub cert_pem: String,
    /// The server certificate's private key.
    pub key_pem: String,
}

/// A fresh [`TestAuthority`].
pub fn test_authority() -> anyhow::Result<TestAuthority> {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "order-system test authority");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate()?)?;
    let key = rcgen::KeyPair::generate()?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let cert = rcgen::CertificateParams::new(names)?.signed_by(&key, &ca)?;
    Ok(TestAuthority { ca_pem: ca.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The rustls server configuration (ring provider, ALPN `h2` then `http/1.1`).
pub async fn server_config(config: &TlsConfig) -> anyhow::Result<RustlsConfig> {
    let (cert_pem, key_pem) = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => (tokio::fs::read(cert).await?, tokio::fs::read(key).await?),
        (None, None) => {
            let (cert, key) = development_certificate()?;
            tracing::info!("no TLS certificate configured: serving a self-signed development certificate");
            (cert.into_bytes(), key.into_bytes())
        }
        _ => anyhow::bail!("set both --tls-cert and --tls-key, or neither"),
    };
    let certs = CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(server)))
}

/// Serves `router` over TLS on `listener` until `shutdown`, then gives open
/// connections `grace` to finish.
pub async fn serve_tls(
    listener: std::net::TcpListener,
    router: Router,
    tls: RustlsConfig,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopper.graceful_shutdown(Some(grace));
    });
    tracing::info!(%addr, "listening (HTTPS, h2 and http/1.1)");
    axum_server::from_tcp_rustls(listener, tls)?
        .handle(handle)
        .serve(router.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .await?;
    Ok(())
}

/// Binds `addr` for [`serve_tls`]; `None` when `addr` is empty (HTTPS off).
pub fn bind(addr: &str) -> anyhow::Result<Option<std::net::TcpListener>> {
    if addr.trim().is_empty() {
        return Ok(None);
    }
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("binding the HTTPS address {addr}: {e}"))?;
    Ok(Some(listener))
}
