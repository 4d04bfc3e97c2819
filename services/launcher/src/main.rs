//! Runs the whole order system in one process: every service on its own
//! port, against one PostgreSQL server (a database per service, created and
//! migrated at start) and one RabbitMQ broker. Defaults suit a developer
//! machine with both running locally; the gateway answers on 127.0.0.1:8080.

use clap::Parser;
use runtime::{MessagingConfig, Tasks};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "order-system", about = "Runs every service of the order system in one process")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// PostgreSQL server; each service uses its own database on it.
    #[arg(long, env = "POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres_url: String,

    #[command(flatten)]
    messaging: MessagingConfig,

    /// Address of the public gateway.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    gateway_addr: SocketAddr,

    /// Interface the internal services listen on (ports: gateway + 1 ... + 5).
    #[arg(long, env = "INTERNAL_HOST", default_value = "127.0.0.1")]
    internal_host: IpAddr,

    #[command(flatten)]
    mail: notification::MailConfig,

    #[command(flatten)]
    web_push: notification::WebPushConfig,

    #[command(flatten)]
    idempotency: runtime::idempotency::IdempotencyConfig,

    #[command(flatten)]
    sweeper: ordering::sweeper::SweeperConfig,

    #[arg(long, env = "TOKEN_TTL_SECS", default_value_t = 3600)]
    token_ttl_secs: u64,

    /// How often identity reloads its signing keys (a rotation takes effect within it).
    #[arg(long, env = "SIGNING_KEY_RELOAD_SECS", default_value_t = 10)]
    signing_key_reload_secs: u64,

    #[arg(long, env = "SSE_HEARTBEAT_SECS", default_value_t = 15)]
    heartbeat_secs: u64,

    /// HTTPS address of the gateway (HTTP/2 and HTTP/1.1); empty turns it off.
    #[arg(long, env = "GATEWAY_HTTPS_ADDR", default_value = "127.0.0.1:8443")]
    gateway_https_addr: String,

    /// HTTPS address of the push service itself; empty turns it off.
    #[arg(long, env = "PUSH_TLS_ADDR", default_value = "127.0.0.1:8086")]
    push_tls_addr: String,

    /// Use the push service at this URL (e.g. a separate `push-service`
    /// process) instead of starting one in this process.
    #[arg(long, env = "EXTERNAL_PUSH_URL")]
    external_push_url: Option<String>,

    /// Prefix of the database names (`<prefix>identity`, ...), to run a
    /// second system on the same PostgreSQL server.
    #[arg(long, env = "DATABASE_PREFIX", default_value = "")]
    database_prefix: String,

    #[command(flatten)]
    tls: runtime::tls::TlsConfig,

    #[command(flatten)]
    limits: runtime::HttpLimits,
    /// The gateway's limits per connection and per client address.
    #[command(flatten)]
    connections: runtime::connections::ConnectionLimits,

    #[command(flatten)]
    abuse: identity::AbuseLimits,

    /// Orders, deposits and withdrawals per user a minute.
    #[command(flatten)]
    per_user: runtime::http::PerUserLimits,

    /// Header that carries the client's address, set by the proxy in front of
    /// the gateway (unset: the connection's peer).
    #[arg(long, env = "GATEWAY_CLIENT_IP_HEADER")]
    gateway_client_ip_header: Option<String>,

    /// The gateway reaches the push service over h2c (HTTP/2 without TLS);
    /// `false`: HTTP/1.1, one connection per event stream.
    #[arg(long, env = "GATEWAY_PUSH_H2C", default_value_t = true, action = clap::ArgAction::Set)]
    gateway_push_h2c: bool,

    /// Event streams per h2c connection from the gateway to the push service.
    #[arg(long, env = "GATEWAY_PUSH_STREAMS_PER_CONNECTION", default_value_t = 100)]
    gateway_push_streams_per_connection: usize,

    /// The gateway's key for the assertions the services verify; unset, a
    /// new pair is generated at start (set it when a push service runs as
    /// its own process with EXTERNAL_PUSH_URL: it needs the public half).
    #[command(flatten)]
    signing: runtime::auth::SigningKeyConfig,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Runs every service (the default).
    Run,
    /// Writes the OpenAPI documents generated from the code to DIR
    /// (the committed copies live in contracts/openapi).
    Openapi {
        #[arg(default_value = "contracts/openapi")]
        dir: std::path::PathBuf,
    },
    /// Rotates the token signing key kept in the identity database: identity
    /// signs with the new key within SIGNING_KEY_RELOAD_SECS and keeps
    /// publishing the previous one until the tokens it signed have expired.
    RotateKey,
    /// Prints a new key pair for the gateway's assertions, as environment
    /// lines: INTERNAL_SIGNING_KEY (private, for the gateway only: a secret)
    /// and INTERNAL_VERIFY_KEY (public, for every other service).
    InternalKeys,
    /// Moves the messages of QUEUE's dead-letter queue (QUEUE.dead) back to
    /// QUEUE, once the cause of their failure is fixed.
    ReplayDeadLetters { queue: String },
    /// Checks the invariants across the services' databases and the broker
    /// (balances = ledgers, one payment and one notification per final order,
    /// no order pending too long, empty dead-letter queues) and prints a
    /// report; exits 1 on any violation.
    Audit {
        /// RabbitMQ management API (credentials in the URL).
        #[arg(long, env = "RABBITMQ_API_URL", default_value = "http://guest:guest@127.0.0.1:15672/api")]
        rabbitmq_api: String,
        /// An order pending longer than this is a violation.
        #[arg(long, env = "AUDIT_PENDING_THRESHOLD_SECS", default_value_t = 300)]
        pending_threshold_secs: u64,
        /// Orders settled less than this ago are not yet checked for their
        /// notification (it may be on its way).
        #[arg(long, env = "AUDIT_NOTIFICATION_GRACE_SECS", default_value_t = 60)]
        notification_grace_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init("order-system");
    let cli = Cli::parse();
    if let Some(Command::Openapi { dir }) = &cli.command {
        std::fs::create_dir_all(dir)?;
        for (name, json) in order_system::openapi::all_documents() {
            std::fs::write(dir.join(&name), json)?;
            println!("wrote {}", dir.join(&name).display());
        }
        return Ok(());
    }
    if let Some(Command::ReplayDeadLetters { queue }) = &cli.command {
        let broker = runtime::Broker::new(&cli.messaging.amqp_url).with_ca(cli.messaging.amqp_ca()?);
        let moved = runtime::consumer::replay_dead_letters(&broker, queue).await?;
        broker.close().await;
        println!("moved {moved} message(s) from {queue}.dead back to {queue}");
        return Ok(());
    }
    if let Some(Command::InternalKeys) = &cli.command {
        let signer = runtime::auth::AssertionSigner::generate();
        println!("# The gateway's private key: keep it secret (a Kubernetes Secret, a Docker secret).");
        println!("INTERNAL_SIGNING_KEY={}", signer.private_key_text());
        println!("# Its public half, for every service behind the gateway (and the launcher's EXTERNAL_PUSH_URL one).");
        println!("INTERNAL_VERIFY_KEY={}", signer.verify_keys().text());
        return Ok(());
    }
    let db = |name: &str| format!("{}/{}{name}", cli.postgres_url.trim_end_matches('/'), cli.database_prefix);
    if let Some(Command::RotateKey) = &cli.command {
        let kid = identity::rotate_signing_key(&db("identity")).await?;
        println!("new token signing key {kid}; identity replicas sign with it within SIGNING_KEY_RELOAD_SECS");
        return Ok(());
    }
    if let Some(Command::Audit { rabbitmq_api, pending_threshold_secs, notification_grace_secs }) = &cli.command {
        let config = order_system::audit::AuditConfig {
            billing_db: db("billing"),
            ordering_db: db("ordering"),
            notification_db: db("notification"),
            rabbitmq_api: rabbitmq_api.clone(),
            vhost: order_system::audit::vhost_of(&cli.messaging.amqp_url),
            amqp_url: Some(cli.messaging.amqp_url.clone()),
            pending_threshold: std::time::Duration::from_secs(*pending_threshold_secs),
            notification_grace: std::time::Duration::from_secs(*notification_grace_secs),
        };
        let report = order_system::audit::run(&config).await?;
        print!("{report}");
        std::process::exit(if report.is_clean() { 0 } else { 1 });
    }
    let shutdown = CancellationToken::new();
    runtime::shutdown::on_signal(shutdown.clone());

    let port = |n: u16| SocketAddr::new(cli.internal_host, cli.gateway_addr.port() + n);
    let url = |addr: SocketAddr| format!("http://{addr}");
    let (identity_addr, billing_addr, ordering_addr, notification_addr, push_addr) =
        (port(1), port(2), port(3), port(4), port(5));
    let mail_dir: PathBuf = cli.mail.mail_dir.clone();

    // The gateway signs who the caller is; the services verify it.
    let signer = cli.signing.signer().unwrap_or_else(|_| {
        tracing::info!("no INTERNAL_SIGNING_KEY: a new key pair for the gateway's assertions");
        runtime::auth::AssertionSigner::generate()
    });
    let callers = runtime::auth::CallerKeys { verify_keys: signer.verify_keys() };

    let limits = fit_pools(&cli).await;
    let mut tasks = Tasks::new(shutdown.clone());
    let identity = identity::Config {
        database_url: db("identity"),
        messaging: cli.messaging.clone(),
        limits: limits.clone(),
        token_ttl_secs: cli.token_ttl_secs,
        jwt_private_key_pem: std::env::var("JWT_PRIVATE_KEY_PEM").ok(),
        // Identity is reached through the gateway, which sets this header.
        abuse: identity::AbuseLimits { client_ip_header: Some("x-forwarded-for".into()), ..cli.abuse.clone() },
        cookie_secure: false,
        signing_key_reload_secs: cli.signing_key_reload_secs,
        addr: identity_addr.to_string(),
        callers: callers.clone(),
    };
    tasks.spawn("identity", identity::run(identity, TcpListener::bind(identity_addr).await?, shutdown.clone()));
    let billing = billing::Config {
        database_url: db("billing"),
        messaging: cli.messaging.clone(),
        idempotency: cli.idempotency.clone(),
        limits: limits.clone(),
        addr: billing_addr.to_string(),
        callers: callers.clone(),
        per_user: cli.per_user.clone(),
    };
    tasks.spawn("billing", billing::run(billing, TcpListener::bind(billing_addr).await?, shutdown.clone()));
    let ordering = ordering::Config {
        database_url: db("ordering"),
        messaging: cli.messaging.clone(),
        idempotency: cli.idempotency.clone(),
        api_only: false,
        sweeper: cli.sweeper.clone(),
        limits: limits.clone(),
        addr: ordering_addr.to_string(),
        callers: callers.clone(),
        per_user: cli.per_user.clone(),
    };
    tasks.spawn("ordering", ordering::run(ordering, TcpListener::bind(ordering_addr).await?, shutdown.clone()));
    let notification = notification::Config {
        database_url: db("notification"),
        messaging: cli.messaging.clone(),
        limits: limits.clone(),
        mail: notification::MailConfig { mail_dir, ..cli.mail.clone() },
        web_push: cli.web_push.clone(),
        addr: notification_addr.to_string(),
        callers: callers.clone(),
    };
    tasks.spawn(
        "notification",
        notification::run(notification, TcpListener::bind(notification_addr).await?, shutdown.clone()),
    );
    let push_url = match &cli.external_push_url {
        Some(external) => external.clone(),
        None => {
            let push = push_service::Config {
                heartbeat_secs: cli.heartbeat_secs,
                addr: push_addr.to_string(),
                tls_addr: cli.push_tls_addr.clone(),
                tls: cli.tls.clone(),
                limits: limits.clone(),
                // Its own HTTPS port faces browsers too: it checks tokens itself.
                identity_url: Some(url(identity_addr)),
                ..push_service::Config::local(cli.messaging.clone(), signer.verify_keys())
            };
            let listener = TcpListener::bind(push_addr).await?;
            tasks.spawn("push-service", push_service::run(push, listener, shutdown.clone()));
            url(push_addr)
        }
    };
    let gateway = gateway::Config {
        addr: cli.gateway_addr.to_string(),
        identity_url: url(identity_addr),
        billing_url: url(billing_addr),
        ordering_url: url(ordering_addr),
        notification_url: url(notification_addr),
        push_url,
        push_h2c: cli.gateway_push_h2c,
        push_streams_per_connection: cli.gateway_push_streams_per_connection,
        verifier: Default::default(),
        upstream_timeout_secs: 30,
        client_ip_header: cli.gateway_client_ip_header.clone(),
        https_addr: cli.gateway_https_addr.clone(),
        tls: cli.tls.clone(),
        limits: limits.clone(),
        connections: cli.connections.clone(),
        signing: runtime::auth::SigningKeyConfig::with(signer),
    };
    tasks.spawn("gateway", gateway::run(gateway, TcpListener::bind(cli.gateway_addr).await?, shutdown.clone()));
    tracing::info!(gateway = %cli.gateway_addr, "order system running; Ctrl-C stops it");
    let result = tasks.join().await;
    runtime::telemetry::flush();
    result
}

/// The services of this process share one PostgreSQL server: their pools
/// (and each one's LISTEN connections) must fit in what it accepts, or under
/// load a growing pool waits its whole acquire timeout (5 s) for connections
/// the server refuses (seen at 100 clients: orders stalled 5 s when the four
/// pools of 40 outgrew a server of 100). `DATABASE_POOL_SIZE` is shrunk to
/// fit, with a warning.
async fn fit_pools(cli: &Cli) -> runtime::HttpLimits {
    /// identity, billing, ordering, notification; up to 3 LISTEN connections each.
    const SERVICES: u32 = 4;
    const LISTENERS: u32 = 3;
    let mut limits = cli.limits.clone();
    let server = format!("{}/postgres", cli.postgres_url.trim_end_matches('/'));
    // A server that does not answer is waited for later, by each service.
    let asked = tokio::time::timeout(std::time::Duration::from_secs(5), runtime::db::free_connections(&server));
    let free = match asked.await.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 5 s"))) {
        Ok(free) => free,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not ask PostgreSQL how many connections it accepts; pools as configured");
            return limits;
        }
    };
    let fitted = runtime::db::fitted_pool_size(limits.database_pool_size, SERVICES, LISTENERS, free);
    if fitted < limits.database_pool_size {
        tracing::warn!(
            requested = limits.database_pool_size,
            fitted,
            free,
            "PostgreSQL accepts {free} more connections: each service's pool is limited to {fitted} \
             (raise the server's max_connections for larger pools)"
        );
        limits.database_pool_size = fitted;
    }
    limits
}
