//! `GET /api/v1/orders`: the calling user's order events as server-sent
//! events, resumable from the last id a browser saw.
//!
//! A connection first subscribes to the hub's live fan-out, which fixes the
//! position `P`: every event after `P` arrives live. If the browser resumes
//! from an id `N < P` (`Last-Event-ID`, or `?lastEventId=` on a first
//! connection from a page that kept it), the connection replays `N+1 ..= P`
//! from the stream, keeping the user's events, while live events wait in its
//! buffer; then it continues live. Nothing between `N` and the live events is
//! missed and nothing is sent twice. If the stream no longer holds `N+1`
//! (older than the retention), a `reset` event says so.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use rand::Rng;
use runtime::ApiError;
use runtime::auth::CurrentUser;
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::AppState;
use crate::hub::{Entry, Missed, PushEvent};
use crate::stream::{self, From};

/// The typed event that tells a page its history is gone: refetch.
pub const RESET: &str = "reset";

/// How long a replay waits for the stream before concluding that what it
/// asked for no longer exists.
const REPLAY_IDLE: Duration = Duration::from_secs(10);
/// How long a connection waits for a replica that is still attaching.
const READY_WAIT: Duration = Duration::from_secs(10);

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResumeQuery {
    /// On a first connection, the id of the last event an earlier page saw
    /// (a reconnect sends the `Last-Event-ID` header instead, which wins).
    #[serde(rename = "lastEventId")]
    #[param(rename = "lastEventId")]
    last_event_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Resume {
    Fresh,
    From(u64),
    /// An id this service never issued (e.g. from before an upgrade).
    Unknown,
}

fn resume_point(headers: &HeaderMap, query: &ResumeQuery) -> Resume {
    let header = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let id = header.or(query.last_event_id.as_deref()).map(str::trim).filter(|s| !s.is_empty());
    match id {
        None => Resume::Fresh,
        Some(id) => id.parse().map(Resume::From).unwrap_or(Resume::Unknown),
    }
}

fn event_of(e: &PushEvent) -> Option<Event> {
    match Event::default().id(e.offset.to_string()).event(e.event).json_data(&e.data) {
        Ok(event) => Some(event),
        Err(err) => {
            tracing::error!(error = %err, "event not serialisable");
            None
        }
    }
}

/// `reset` with the id to resume from afterwards.
fn reset_event(id: u64, asked: Option<u64>) -> Event {
    let data = serde_json::json!({
        "reason": "the events after the requested id are no longer retained; refetch your orders",
        "lastEventId": asked,
    });
    Event::default().id(id.to_string()).event(RESET).data(data.to_string())
}

/// The stream's user: from its own check of the token when configured
/// (`runtime::tokens`), else from the gateway's `X-User-Id`.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<CurrentUser, ApiError> {
    let Some(verifier) = &state.verifier else {
        let id = headers
            .get(runtime::auth::USER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Uuid::parse_str(v).ok())
            .ok_or_else(|| ApiError::unauthorized("authentication required"))?;
        return Ok(CurrentUser { id, email: String::new() });
    };
    let token = runtime::tokens::token_of(headers).ok_or_else(|| {
        ApiError::unauthorized("authentication required: send a bearer token or the accessToken cookie")
    })?;
    let claims = verifier
        .verify(token)
        .await
        .map_err(|_| ApiError::unauthorized("the access token is invalid, expired or revoked"))?;
    tracing::Span::current().record("user_id", tracing::field::display(claims.user_id));
    Ok(CurrentUser { id: claims.user_id, email: claims.email })
}

#[utoipa::path(get, path = "/api/v1/orders", tag = "push", operation_id = "getOrderEvents",
    description = "The user's order outcomes as server-sent events: `event: OrderCreated` or `OrderFailed` with \
        the order in `data:`, `id:` its position in the order event stream (the same on every replica), \
        `event: reset` when the history asked for is gone (refetch the orders). Resumes after `Last-Event-ID` \
        or `?lastEventId=`. Authenticated by the `accessToken` cookie or a bearer token, never by the URL.",
    params(ResumeQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (sent by EventSource on reconnect)")),
    responses(
        (status = 200, description = "An endless `text/event-stream`; each event's data is an `OrderEventData`",
            content_type = "text/event-stream", body = crate::hub::OrderEventData),
        runtime::http::responses::NotAuthenticated,
        (status = 503, description = "The stream is not available yet", body = contracts::api::ErrorBody),
    ))]
pub async fn order_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ResumeQuery>,
) -> Result<Response, ApiError> {
    let user = authenticate(&state, &headers).await?;
    let resume = resume_point(&headers, &query);
    if state.hub.position().is_none() && tokio::time::timeout(READY_WAIT, state.hub.ready()).await.is_err() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the event stream is not available yet"));
    }
    let after = match resume {
        Resume::From(n) => Some(n),
        _ => None,
    };
    let (mut subscription, position, missed) = state.hub.subscribe_after(user.id, after);
    let position = position.expect("the hub is ready");
    let shutdown = state.shutdown.clone();
    tracing::info!(user_id = %user.id, ?resume, position, "stream opened");

    let stream = async_stream::stream! {
        yield Ok::<_, Infallible>(Event::default().retry(state.retry).comment("connected"));
        // Events up to `covered` have been sent or were never this
        // connection's to send; live events at or below it are dropped.
        let mut covered = None;
        let mut open = true;
        match resume {
            Resume::Fresh => {}
            Resume::Unknown => {
                yield Ok(reset_event(position, None));
                covered = Some(position);
            }
            Resume::From(n) if n >= position => covered = Some(n),
            Resume::From(n) => {
                if let Missed::InMemory(events) = missed {
                    for e in &events {
                        if let Some(event) = event_of(e) {
                            yield Ok(event);
                        }
                    }
                    covered = Some(position);
                } else {
                    let permit = tokio::select! {
                        _ = shutdown.cancelled() => None,
                        p = state.replays.acquire() => p.ok(),
                    };
                    let reader = match permit {
                        Some(_) => stream::open(&state.broker, &state.spec, From::Offset(n + 1), state.prefetch).await.ok(),
                        None => None,
                    };
                    let Some((channel, consumer)) = reader else {
                        // The client retries from its id.
                        tracing::warn!(user_id = %user.id, "replay unavailable; closing the stream");
                        return;
                    };
                    let mut consumer = std::pin::pin!(consumer);
                    let mut first = true;
                    loop {
                        let next = tokio::select! {
                            _ = shutdown.cancelled() => { open = false; break }
                            next = tokio::time::timeout(REPLAY_IDLE, consumer.next()) => next,
                        };
                        let delivery = match next {
                            Err(_) if first => {
                                // The stream holds nothing from N+1 on: expired.
                                yield Ok(reset_event(position, Some(n)));
                                covered = Some(position);
                                break;
                            }
                            Err(_) => { open = false; break } // stalled: the client resumes
                            Ok(Some(Ok(d))) => d,
                            Ok(_) => { open = false; break }
                        };
                        let Ok(entry) = stream::entry_of(delivery).await else { open = false; break };
                        let offset = entry.offset();
                        if offset <= n {
                            continue; // the rest of the chunk that holds N+1
                        }
                        if first && offset > n + 1 {
                            tracing::info!(user_id = %user.id, asked = n, oldest = offset, "resume point expired");
                            yield Ok(reset_event(offset - 1, Some(n)));
                            covered = Some(offset - 1);
                        }
                        first = false;
                        if offset > position {
                            // Everything up to the position has been read.
                            covered = covered.max(Some(position));
                            break; // live from here on
                        }
                        if let Entry::Event(e) = &entry
                            && e.user_id == user.id
                            && let Some(event) = event_of(e)
                        {
                            yield Ok(event);
                        }
                        covered = Some(offset);
                        if offset >= position {
                            break;
                        }
                    }
                    let _ = channel.close(200, "replayed".into()).await;
                    if covered.is_some_and(|c| c < position) {
                        open = false; // interrupted: the client resumes from its id
                    }
                }
            }
        }
        if !open {
            return;
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Spread the reconnections of a draining replica.
                    let delay = rand::thread_rng().gen_range(Duration::ZERO..=state.drain);
                    tokio::time::sleep(delay).await;
                    break;
                }
                next = subscription.recv() => next,
            };
            match next {
                Ok(e) => {
                    if covered.is_some_and(|c| e.offset <= c) {
                        continue;
                    }
                    if let Some(event) = event_of(&e) {
                        yield Ok(event);
                    }
                }
                // Fell behind: close, so the browser resumes from its last id.
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(user_id = %user.id, missed = n, "stream fell behind; closing it");
                    break;
                }
                Err(RecvError::Closed) => break,
            }
        }
    };
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(state.heartbeat)).into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache, no-transform"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_wins_over_the_query_and_bad_ids_are_unknown() {
        let q = |v: Option<&str>| ResumeQuery { last_event_id: v.map(String::from) };
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, &q(None)), Resume::Fresh);
        assert_eq!(resume_point(&h, &q(Some("7"))), Resume::From(7));
        h.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(resume_point(&h, &q(Some("7"))), Resume::From(9));
        h.insert("last-event-id", HeaderValue::from_static("0b9c-not-an-offset"));
        assert_eq!(resume_point(&h, &q(None)), Resume::Unknown);
    }
}
