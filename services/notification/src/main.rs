#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::service::main("notification", |c: &notification::Config| &c.addr, notification::run).await
}
