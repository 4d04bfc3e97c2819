#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::service::main("billing", |c: &billing::Config| &c.addr, billing::run).await
}
