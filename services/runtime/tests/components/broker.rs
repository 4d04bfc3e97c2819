//! The broker client: shutdown always ends, and a broker that never
//! answers is given up on and retried.

use std::time::Duration;
use test_support::eventually;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_broker_that_accepts_and_never_answers_is_given_up_on_and_retried() {
    let silent = test_support::SilentListener::start().await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", silent.port);
    let broker = runtime::Broker::with_timeout("test", url, Duration::from_millis(300));
    let shutdown = CancellationToken::new();
    let waiting = tokio::spawn({
        let (broker, shutdown) = (broker.clone(), shutdown.clone());
        async move { broker.wait_for_channel(false, &shutdown).await.is_some() }
    });
    eventually(Duration::from_secs(10), || async { (silent.accepted() >= 3).then_some(()) }).await;
    assert!(!broker.is_connected());
    shutdown.cancel();
    let connected = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("gave up on shutdown").unwrap();
    assert!(!connected);
}
