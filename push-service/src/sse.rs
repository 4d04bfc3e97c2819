//! `GET /api/v1/orders`: the calling user's order events as server-sent events.

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use runtime::auth::CurrentUser;
use std::convert::Infallible;
use tokio::sync::broadcast::error::RecvError;

use crate::AppState;

pub async fn order_events(
    State(state): State<AppState>,
    user: CurrentUser,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut subscription = state.hub.subscribe(user.id);
    let shutdown = state.shutdown.clone();
    tracing::info!(user_id = %user.id, "stream opened");
    let stream = async_stream::stream! {
        yield Ok(Event::default().retry(std::time::Duration::from_secs(3)).comment("connected"));
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = subscription.recv() => next,
            };
            match next {
                Ok(e) => {
                    let event = Event::default().id(e.id.clone()).event(e.event);
                    match event.json_data(&e.data) {
                        Ok(event) => yield Ok(event),
                        Err(err) => tracing::error!(error = %err, "event not serialisable"),
                    }
                }
                // Fell behind: close, so the browser reconnects and refetches.
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(user_id = %user.id, missed = n, "stream fell behind; closing it");
                    break;
                }
                Err(RecvError::Closed) => break,
            }
        }
    };
    Sse::new(stream).keep_alive(KeepAlive::new().interval(state.heartbeat))
}
