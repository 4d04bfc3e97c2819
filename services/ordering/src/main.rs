#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::service::main("ordering", |c: &ordering::Config| &c.addr, ordering::run).await
}
