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
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use contracts::api::TokenClaims;
use futures::StreamExt;
use rand::Rng;
use runtime::ApiError;
use runtime::auth::CurrentUser;
use runtime::auth::tokens::TokenError;
use serde::Deserialize;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::AppState;
use crate::hub::{Entry, Missed, PushEvent, Subscription};
use crate::replays::ReplaySlot;
use crate::stream::{self, Start};
use tokio_util::sync::CancellationToken;

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
    /// `true`: the user's notifications too (`event: NotificationCreated`),
    /// besides the order outcomes, with the same ids and resume guarantees.
    #[serde(default)]
    notifications: bool,
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

/// The SSE event of `e`, unless it is a notification and the connection
/// did not ask for them (`notifications`).
fn event_of(e: &PushEvent, notifications: bool) -> Option<Event> {
    if !notifications && matches!(e.data, crate::hub::EventData::Notification(_)) {
        return None;
    }
    match Event::default().id(e.offset.to_string()).event(e.event).json_data(&e.data) {
        Ok(event) => Some(event),
        Err(err) => {
            tracing::error!(error = %err, "event not serialisable");
            None
        }
    }
}

/// Why a `reset`: the history is gone, or too long to replay.
const GONE: &str = "the events after the requested id are no longer retained; refetch your orders";
const TOO_FAR: &str = "the requested id is too far back to replay; refetch your orders";

/// `reset` with the id to resume from afterwards.
fn reset_event(id: u64, asked: Option<u64>) -> Event {
    reset_event_because(id, asked, GONE)
}

fn reset_event_because(id: u64, asked: Option<u64>, reason: &str) -> Event {
    let data = serde_json::json!({
        "reason": reason,
        "lastEventId": asked,
    });
    Event::default().id(id.to_string()).event(RESET).data(data.to_string())
}

/// Marks the requests of the port that faces browsers (HTTPS): they bring
/// the user's own token; every other port is behind the gateway.
#[derive(Clone, Copy)]
pub(crate) struct BrowserFacing;

/// The stream's user, and the token it was opened with when this service
/// checked one itself.
pub struct StreamUser {
    user: CurrentUser,
    claims: Option<TokenClaims>,
}

impl axum::extract::FromRequestParts<AppState> for StreamUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let (user, claims) = authenticate(state, parts).await?;
        tracing::Span::current().record("user_id", tracing::field::display(user.id));
        Ok(StreamUser { user, claims })
    }
}

/// On the port facing browsers, the user's token checked here
/// (`runtime::auth::tokens`; a replica refuses to open that port without it);
/// on the internal port, the gateway's assertion, as every service checks it.
async fn authenticate(state: &AppState, parts: &mut Parts) -> Result<(CurrentUser, Option<TokenClaims>), ApiError> {
    if parts.extensions.get::<BrowserFacing>().is_none() {
        return Ok((runtime::auth::caller(parts)?, None));
    }
    let verifier = state
        .verifier
        .as_ref()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a browser-facing port without token verification")))?;
    let token = runtime::auth::tokens::token_of(&parts.headers).ok_or(TokenError::Missing)?;
    // A token that cannot be judged now is a 503 (fail closed); any other
    // failure a 401.
    let claims = verifier.verify(token).await.map_err(|e| match e {
        TokenError::RevocationsStale | TokenError::Unavailable | TokenError::UnknownKeyYet => e,
        _ => TokenError::Invalid,
    })?;
    let user = CurrentUser {
        id: claims.user_id,
        email: claims.email.clone(),
        token_id: claims.jti,
        token_expires: claims.exp,
    };
    Ok((user, Some(claims)))
}

#[utoipa::path(get, path = "/api/v1/orders", tag = "push", operation_id = "getOrderEvents",
    description = "The user's order outcomes and notifications as server-sent events: `event: OrderCreated` or \
        `OrderFailed` with the order in `data:` (an `OrderEventData`), `event: NotificationCreated` with the new \
        notification (a `NotificationEventData`; with `?notifications=true` only), `id:` its position in the order event stream (the same on every replica; a fresh stream's first frame \
        and the end of a replay carry an `id:` with no event, so a client that drops early resumes from there), \
        `event: reset` when the history asked for is gone or too far back to replay (refetch the orders). Resumes after `Last-Event-ID` \
        or `?lastEventId=`. Authenticated by the `accessToken` cookie or a bearer token, never by the URL. \
        The stream ends when that token expires or is logged out: reconnect with a fresh token and the \
        `Last-Event-ID` to miss nothing.",
    params(ResumeQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (sent by EventSource on reconnect)")),
    responses(
        (status = 200, description = "An endless `text/event-stream`; each event's data is an `OrderEventData` \
            or a `NotificationEventData`, as its `event:` says",
            content_type = "text/event-stream", body = crate::hub::EventData),
        runtime::http::responses::NotAuthenticated,
        (status = 429, description = "The user already holds as many open streams as allowed \
            (`PUSH_MAX_STREAMS_PER_USER`)", body = contracts::api::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "The stream is not available yet, the token cannot be checked now \
            (the list of revoked tokens is out of date), or no replay slot for a resume was free in time",
            body = contracts::api::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
pub async fn order_events(
    State(state): State<AppState>,
    StreamUser { user, claims }: StreamUser,
    headers: HeaderMap,
    Query(query): Query<ResumeQuery>,
) -> Result<Response, ApiError> {
    // Checked here, the stream ends with its token (expiry or logout); behind
    // the gateway, the gateway ends it (logout too), and so does this
    // service when the token the assertion names expires.
    let verifier = state.verifier.clone();
    let opened_by = user.clone();
    let token_ended = async move {
        match (verifier, claims) {
            (Some(v), Some(c)) => v.until_ended(&c).await,
            _ => opened_by.token_expired().await,
        }
    };
    let resume = resume_point(&headers, &query);
    let admitted = admit(&state, user.id, resume).await?;
    tracing::info!(user_id = %user.id, ?resume, position = admitted.position, notifications = query.notifications,
        "stream opened");
    let heartbeat = state.heartbeat;
    let stream = connection(state, user.id, resume, admitted, query.notifications).take_until(token_ended);
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(heartbeat)).into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache, no-transform"));
    Ok(response)
}

/// A connection let in: subscribed to the live events after `position`,
/// with what it owes from before (and the replay slot to read it with).
struct Admitted {
    subscription: Subscription,
    position: u64,
    missed: Missed,
    /// The resume point is further back than a replay may read: `reset`.
    too_far: bool,
    slot: Option<ReplaySlot>,
}

/// Lets `user`'s connection in, or says why not: the hub not attached yet
/// (503), the user's open streams at their cap (429), no replay slot in time
/// for a resume that reads the stream (503).
async fn admit(state: &AppState, user: Uuid, resume: Resume) -> Result<Admitted, ApiError> {
    let retry = jittered(state.retry).max(Duration::from_secs(1));
    if state.hub.position().is_none() && tokio::time::timeout(READY_WAIT, state.hub.ready()).await.is_err() {
        return Err(ApiError::unavailable("the event stream is not available yet", retry));
    }
    let after = match resume {
        Resume::From(n) => Some(n),
        _ => None,
    };
    let Ok((subscription, position, missed)) = state.hub.subscribe_after(user, after, state.max_streams_per_user)
    else {
        tracing::info!(user_id = %user, "too many open streams");
        let message = format!("too many open event streams for this user (at most {})", state.max_streams_per_user);
        return Err(ApiError::too_many_requests(message, retry));
    };
    let position = position.expect("the hub is ready");
    // A resume that would read more than allowed starts over (`reset`); one
    // that reads the stream needs a replay slot, got before answering.
    let reads_after = match &missed {
        Missed::InStream { after } => Some(*after),
        _ => after,
    };
    let too_far = reads_after.is_some_and(|n| position.saturating_sub(n) > state.max_replay_entries);
    let slot = match (&missed, after) {
        (Missed::InStream { .. }, Some(n)) if n < position && !too_far => match state.replays.acquire(user).await {
            Some(slot) => Some(slot),
            None => {
                tracing::warn!(user_id = %user, "no replay slot in time");
                return Err(ApiError::unavailable("too many resumes at once; try again shortly", retry));
            }
        },
        _ => None,
    };
    Ok(Admitted { subscription, position, missed, too_far, slot })
}

/// The reconnection delay one connection is told (its `retry:` field, the
/// `Retry-After` of a refusal): the configured one spread over
/// `[retry/2, 2·retry]`, drawn per connection. The streams a restart cuts
/// all end at the same instant; with one delay for all they would all come
/// back at the same instant too, and meet the gateway's load shedding as a
/// herd. Spread, 2,000 streams with the default 3 s arrive over 4.5 s.
fn jittered(retry: Duration) -> Duration {
    let ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX / 4);
    if ms == 0 {
        return retry;
    }
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.saturating_mul(2)))
}

/// What an admitted connection sends: its first frame, what it owes from
/// before (see [`replay`]), then the live events.
fn connection(
    state: AppState,
    user: Uuid,
    resume: Resume,
    admitted: Admitted,
    notifications: bool,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    let Admitted { subscription, position, missed, too_far, slot } = admitted;
    let (shutdown, drain) = (state.shutdown.clone(), state.drain);
    async_stream::stream! {
        // A fresh connection's first frame carries its position as the id: a
        // client that drops before its first event then resumes from there,
        // not from whatever is live when it reconnects (a frame with an id and
        // no data sets the browser's last event id without firing an event).
        let first = Event::default().retry(jittered(state.retry));
        let first = if resume == Resume::Fresh { first.id(position.to_string()) } else { first };
        yield Ok(first.comment("connected"));
        let mut end = Replayed::Done { covered: None, open: true };
        for await step in replay(state, user, resume, position, missed, too_far, slot, notifications) {
            match step {
                Replayed::Event(event) => yield Ok(event),
                done => end = done,
            }
        }
        let Replayed::Done { covered, open: true } = end else { return };
        // Everything of this user's up to `covered` has been sent: the next
        // resume starts there, not again from an old event of theirs.
        if let (Resume::From(n), Some(c)) = (resume, covered)
            && c > n
        {
            yield Ok(Event::default().id(c.to_string()));
        }
        for await event in live(subscription, covered, shutdown, drain, user, notifications) {
            yield Ok(event);
        }
    }
}

/// What the replay part of a connection gives: events, then where it ended.
enum Replayed {
    Event(Event),
    /// Events up to `covered` were sent or were never this connection's;
    /// `open: false` ends the connection (the client resumes from its id).
    Done {
        covered: Option<u64>,
        open: bool,
    },
}

/// The events a connection owes before it goes live: none (fresh, or an id
/// at or after the position), a `reset` (an id never issued), from memory,
/// or from the stream. (What a connection was admitted with, passed apart:
/// the live part keeps the subscription.)
#[allow(clippy::too_many_arguments)]
fn replay(
    state: AppState,
    user: Uuid,
    resume: Resume,
    position: u64,
    missed: Missed,
    too_far: bool,
    slot: Option<ReplaySlot>,
    notifications: bool,
) -> impl futures::Stream<Item = Replayed> {
    async_stream::stream! {
        match resume {
            Resume::Fresh => yield Replayed::Done { covered: None, open: true },
            Resume::From(n) if too_far => {
                tracing::info!(user_id = %user, asked = n, position, "resume from too far back; reset");
                yield Replayed::Event(reset_event_because(position, Some(n), TOO_FAR));
                yield Replayed::Done { covered: Some(position), open: true };
            }
            Resume::Unknown => {
                yield Replayed::Event(reset_event(position, None));
                yield Replayed::Done { covered: Some(position), open: true };
            }
            Resume::From(n) if n >= position => yield Replayed::Done { covered: Some(n), open: true },
            Resume::From(n) => match missed {
                Missed::InStream { after } => {
                    for await step in replay_from_stream(state, user, after.max(n), position, slot, notifications) {
                        yield step;
                    }
                }
                Missed::InMemory(events) => {
                    for event in replay_from_memory(&events, notifications) {
                        yield Replayed::Event(event);
                    }
                    yield Replayed::Done { covered: Some(position), open: true };
                }
                Missed::Nothing => {
                    for await step in replay_from_stream(state, user, n, position, slot, notifications) {
                        yield step;
                    }
                }
            },
        }
    }
}

/// The user's missed events the hub still holds.
fn replay_from_memory(events: &[std::sync::Arc<PushEvent>], notifications: bool) -> Vec<Event> {
    events.iter().filter_map(|e| event_of(e, notifications)).collect()
}

/// Reads the stream from `asked + 1` up to `position`, keeping the user's
/// events; [`StreamReplay`] decides what each entry means.
fn replay_from_stream(
    state: AppState,
    user: Uuid,
    asked: u64,
    position: u64,
    slot: Option<ReplaySlot>,
    notifications: bool,
) -> impl futures::Stream<Item = Replayed> {
    async_stream::stream! {
        // The slot is held for the whole replay.
        let _slot = slot;
        let Some((channel, consumer)) = open_reader(&state, asked + 1).await else {
            // The client retries from its id.
            tracing::warn!(user_id = %user, "replay unavailable; closing the stream");
            yield Replayed::Done { covered: None, open: false };
            return;
        };
        let mut consumer = std::pin::pin!(consumer);
        let mut replay = StreamReplay::new(asked, position);
        let mut open = true;
        loop {
            let next = tokio::select! {
                _ = state.shutdown.cancelled() => { open = false; break }
                next = tokio::time::timeout(REPLAY_IDLE, consumer.next()) => next,
            };
            let delivery = match next {
                Err(_) => match replay.on_idle() {
                    Some(reset) => { yield Replayed::Event(reset); break }
                    None => { open = false; break } // stalled: the client resumes
                },
                Ok(Some(Ok(d))) => d,
                Ok(_) => { open = false; break }
            };
            let Ok(entry) = stream::entry_of(delivery).await else { open = false; break };
            let step = replay.on_entry(entry.offset());
            if let Some(reset) = step.reset {
                tracing::info!(user_id = %user, asked, oldest = entry.offset(), "resume point expired");
                yield Replayed::Event(reset);
            }
            if step.send
                && let Entry::Event(e) = &entry
                && e.user_id == user
                && !state.hub.is_duplicate(e)
                && let Some(event) = event_of(e, notifications)
            {
                yield Replayed::Event(event);
            }
            if step.last {
                break;
            }
        }
        runtime::messaging::channel::close_channel(&channel, "replayed").await;
        // Interrupted before the position: the client resumes from its id.
        let open = open && !replay.interrupted();
        yield Replayed::Done { covered: replay.covered, open };
    }
}

/// A reader of the stream from `offset` (the caller holds a replay slot);
/// `None` on shutdown or when the stream cannot be read.
async fn open_reader(state: &AppState, offset: u64) -> Option<(lapin::Channel, lapin::Consumer)> {
    if state.shutdown.is_cancelled() {
        return None;
    }
    stream::open(&state.broker, &state.spec, Start::Offset(offset), state.prefetch).await.ok()
}

/// The decisions of a replay from the stream, entry by entry.
#[derive(Debug)]
struct StreamReplay {
    asked: u64,
    position: u64,
    first: bool,
    covered: Option<u64>,
}

/// What to do with one stream entry.
#[derive(Debug)]
struct Step {
    /// A `reset` to send first: the entries after `asked` begin later.
    reset: Option<Event>,
    /// Send the entry (if it is the user's).
    send: bool,
    /// The replay is complete after this entry.
    last: bool,
}

impl StreamReplay {
    fn new(asked: u64, position: u64) -> Self {
        StreamReplay { asked, position, first: true, covered: None }
    }

    fn on_entry(&mut self, offset: u64) -> Step {
        let skip = Step { reset: None, send: false, last: false };
        if offset <= self.asked {
            return skip; // the rest of the chunk that holds `asked + 1`
        }
        let mut reset = None;
        if self.first && offset > self.asked + 1 {
            reset = Some(reset_event(offset - 1, Some(self.asked)));
            self.covered = Some(offset - 1);
        }
        self.first = false;
        if offset > self.position {
            // Everything up to the position has been read: live from here on.
            self.covered = self.covered.max(Some(self.position));
            return Step { reset, send: false, last: true };
        }
        self.covered = Some(offset);
        Step { reset, send: true, last: offset >= self.position }
    }

    /// The stream said nothing for a while: before any entry, what was asked
    /// for no longer exists (a `reset`); after one, the replay stalled.
    fn on_idle(&mut self) -> Option<Event> {
        if !self.first {
            return None;
        }
        self.covered = Some(self.position);
        Some(reset_event(self.position, Some(self.asked)))
    }

    fn interrupted(&self) -> bool {
        self.covered.is_some_and(|c| c < self.position)
    }
}

/// Live events after `covered`, until shutdown (spread over `drain`) or the
/// connection falls behind (closed: the browser resumes from its last id).
fn live(
    mut subscription: Subscription,
    covered: Option<u64>,
    shutdown: CancellationToken,
    drain: Duration,
    user: Uuid,
    notifications: bool,
) -> impl futures::Stream<Item = Event> {
    async_stream::stream! {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Spread the reconnections of a draining replica.
                    let delay = rand::thread_rng().gen_range(Duration::ZERO..=drain);
                    tokio::time::sleep(delay).await;
                    break;
                }
                next = subscription.recv() => next,
            };
            match next {
                Ok(e) if covered.is_some_and(|c| e.offset <= c) => {}
                Ok(e) => {
                    if let Some(event) = event_of(&e, notifications) {
                        yield event;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(user_id = %user, missed = n, "stream fell behind; closing it");
                    break;
                }
                Err(RecvError::Closed) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_is_told_its_own_reconnection_delay_around_the_configured_one() {
        let retry = Duration::from_millis(3000);
        let told: Vec<Duration> = (0..2000).map(|_| jittered(retry)).collect();
        assert!(told.iter().all(|d| *d >= retry / 2 && *d <= retry * 2), "within [retry/2, 2·retry]");
        let distinct: std::collections::HashSet<_> = told.iter().collect();
        assert!(distinct.len() > 1000, "spread, not one instant: {} distinct delays of 2000", distinct.len());
        // A quarter of the window holds about a quarter of them, not all.
        let early = told.iter().filter(|d| **d < Duration::from_millis(2625)).count();
        assert!((300..700).contains(&early), "{early} of 2000 in the first quarter of the window");
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_header_wins_over_the_query_and_bad_ids_are_unknown() {
        let q = |v: Option<&str>| ResumeQuery { last_event_id: v.map(String::from), notifications: false };
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, &q(None)), Resume::Fresh);
        assert_eq!(resume_point(&h, &q(Some("7"))), Resume::From(7));
        h.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(resume_point(&h, &q(Some("7"))), Resume::From(9));
        h.insert("last-event-id", HeaderValue::from_static("0b9c-not-an-offset"));
        assert_eq!(resume_point(&h, &q(None)), Resume::Unknown);
    }

    fn shown(e: &Event) -> String {
        format!("{e:?}")
    }

    /// Runs a replay over the offsets the stream delivers: (entries sent,
    /// resets sent as the ids they carry, covered, interrupted).
    fn run(asked: u64, position: u64, offsets: &[u64]) -> (Vec<u64>, Vec<String>, Option<u64>, bool) {
        let mut r = StreamReplay::new(asked, position);
        let (mut sent, mut resets) = (Vec::new(), Vec::new());
        for &offset in offsets {
            let step = r.on_entry(offset);
            resets.extend(step.reset.as_ref().map(shown));
            if step.send {
                sent.push(offset);
            }
            if step.last {
                break;
            }
        }
        (sent, resets, r.covered, r.interrupted())
    }

    #[test]
    fn a_replay_sends_what_follows_the_id_up_to_the_position() {
        let (sent, resets, covered, interrupted) = run(4, 7, &[3, 4, 5, 6, 7, 8]);
        assert_eq!(sent, [5, 6, 7]);
        assert!(resets.is_empty());
        assert_eq!((covered, interrupted), (Some(7), false));
    }

    #[test]
    fn the_rest_of_the_chunk_before_the_id_is_skipped() {
        let (sent, _, covered, _) = run(10, 12, &[8, 9, 10, 11, 12]);
        assert_eq!((sent, covered), (vec![11, 12], Some(12)));
    }

    #[test]
    fn an_expired_id_gets_a_reset_then_what_the_stream_still_holds() {
        let (sent, resets, covered, interrupted) = run(2, 9, &[6, 7, 8, 9]);
        assert_eq!(sent, [6, 7, 8, 9]);
        assert_eq!(resets.len(), 1);
        assert!(resets[0].contains("reset") && resets[0].contains('5'), "{resets:?}");
        assert_eq!((covered, interrupted), (Some(9), false));
    }

    #[test]
    fn an_entry_past_the_position_ends_the_replay_without_being_sent() {
        let (sent, _, covered, interrupted) = run(4, 6, &[5, 8]);
        assert_eq!(sent, [5]);
        assert_eq!((covered, interrupted), (Some(6), false));
    }

    #[test]
    fn a_replay_cut_short_is_interrupted() {
        let (sent, _, covered, interrupted) = run(4, 9, &[5, 6]);
        assert_eq!(sent, [5, 6]);
        assert_eq!((covered, interrupted), (Some(6), true));
    }

    #[test]
    fn a_silent_stream_before_any_entry_means_the_history_is_gone() {
        let mut r = StreamReplay::new(3, 8);
        let reset = r.on_idle().expect("a reset");
        assert!(shown(&reset).contains("reset"));
        assert_eq!((r.covered, r.interrupted()), (Some(8), false));
    }

    #[test]
    fn a_silent_stream_after_an_entry_is_a_stall() {
        let mut r = StreamReplay::new(3, 8);
        r.on_entry(4);
        assert!(r.on_idle().is_none());
        assert!(r.interrupted());
    }

    #[test]
    fn a_replay_from_memory_sends_every_event_in_order() {
        let event = |offset| {
            std::sync::Arc::new(PushEvent {
                offset,
                message_id: None,
                user_id: Uuid::nil(),
                event: "OrderCreated",
                data: crate::hub::EventData::Order(crate::hub::OrderEventData {
                    order_id: Uuid::nil(),
                    status: contracts::api::OrderStatus::Succeeded,
                    price: "1".parse().unwrap(),
                    reason: None,
                    occurred_at: chrono::Utc::now(),
                }),
            })
        };
        let events = replay_from_memory(&[event(3), event(5)], false);
        assert_eq!(events.len(), 2);
        assert!(shown(&events[0]).contains('3') && shown(&events[1]).contains('5'));
    }

    #[test]
    fn notifications_go_only_to_the_connections_that_asked_for_them() {
        let notification = std::sync::Arc::new(PushEvent {
            offset: 4,
            message_id: None,
            user_id: Uuid::nil(),
            event: "NotificationCreated",
            data: crate::hub::EventData::Notification(crate::hub::NotificationEventData {
                id: Uuid::nil(),
                order_id: None,
                message: "Your order for 1.00$ has been successfully processed".into(),
                created_at: chrono::Utc::now(),
            }),
        });
        assert!(replay_from_memory(std::slice::from_ref(&notification), false).is_empty());
        let sent = replay_from_memory(&[notification], true);
        assert_eq!(sent.len(), 1);
        let shown = shown(&sent[0]);
        assert!(shown.contains("event: NotificationCreated") && shown.contains("id: 4"), "{shown}");
        assert!(shown.contains("Your order for 1.00$"), "{shown}");
    }
}
