#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::service::main("push-service", |c: &push_service::Config| &c.addr, push_service::run).await
}
