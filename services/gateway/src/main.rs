use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init("gateway");
    let config = gateway::Config::parse();
    let listener = tokio::net::TcpListener::bind(&config.addr).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    runtime::shutdown::on_signal(shutdown.clone());
    let result = gateway::run(config, listener, shutdown).await;
    runtime::telemetry::flush();
    result
}
