//! What every user of a RabbitMQ channel shares: closing it within a bound,
//! and header values as text. Below the broker and the push stream, which
//! both use it, so that neither imports the other for it.

use lapin::Channel;
use lapin::types::{AMQPValue, LongString};
use std::time::Duration;

/// An AMQP long-string argument value.
pub fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// How long closing a channel or connection may take.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes `channel`, giving up after a bound: a broker that went away never
/// answers the close, and a connection whose socket ended before its close
/// frame was read leaves the close pending for good (seen after a broker
/// shutdown under load: the push service's stream reader waited there and
/// never reconnected). The only way a channel is closed here.
pub async fn close_channel(channel: &Channel, reason: &str) {
    match tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(reason, error = %e, "channel already closed"),
        Err(_) => {
            tracing::warn!(reason, timeout = ?CLOSE_TIMEOUT, "the broker did not answer a channel close; abandoned")
        }
    }
}
