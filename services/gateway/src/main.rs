#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::service::main("gateway", |c: &gateway::Config| &c.addr, gateway::run).await
}
