#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::service::main("identity", |c: &identity::Config| &c.addr, identity::run).await
}
