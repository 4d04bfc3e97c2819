//! Runs the whole order system in one process: every service on its own
//! port, against one PostgreSQL server (a database per service, created and
//! migrated at start) and one RabbitMQ broker. Defaults suit a developer
//! machine with both running locally; the gateway answers on 127.0.0.1:8080.
//! The system is described by `SystemConfig` and built by `System`
//! (src/system.rs); the other subcommands live in src/ops.rs.

use clap::Parser;
use order_system::ops::{self, AuditArgs};
use order_system::system::{Listeners, System, SystemConfig};
use order_system::throwaway::{self, ThrowawayArgs};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "order-system", about = "Runs every service of the order system in one process")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    system: SystemConfig,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Runs every service (the default).
    Run(ThrowawayArgs),
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
    Audit(AuditArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init("order-system");
    let cli = Cli::parse();
    let config = cli.system;
    match cli.command {
        None => run(config).await,
        Some(Command::Run(args)) if args.throwaway => {
            let result = throwaway::run(config, args, on_signal()).await;
            runtime::telemetry::flush();
            result
        }
        Some(Command::Run(_)) => run(config).await,
        Some(Command::Openapi { dir }) => ops::openapi(&dir),
        Some(Command::RotateKey) => ops::rotate_key(&config).await,
        Some(Command::InternalKeys) => ops::internal_keys(),
        Some(Command::ReplayDeadLetters { queue }) => ops::replay_dead_letters(&config, &queue).await,
        Some(Command::Audit(args)) => std::process::exit(if ops::audit(&config, &args).await? { 0 } else { 1 }),
    }
}

fn on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    runtime::shutdown::on_signal(shutdown.clone());
    shutdown
}

/// The system `config` describes, on its configured addresses, until SIGINT/SIGTERM.
async fn run(config: SystemConfig) -> anyhow::Result<()> {
    let shutdown = on_signal();
    let system = System::start(&config, Listeners::configured(&config).await?, shutdown).await?;
    tracing::info!(gateway = %config.gateway_addr, "order system running; Ctrl-C stops it");
    let result = system.join().await;
    runtime::telemetry::flush();
    result
}
