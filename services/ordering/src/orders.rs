//! Placing, listing and polling orders, and settling them when billing answers.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use contracts::Money;
use contracts::api::{CreateOrder, ErrorBody, Order, OrderStatus};
use contracts::messages::{CreatePayment, OrderCreated, OrderFailed, PaymentCreated, PaymentFailed};
use runtime::auth::CurrentUser;
use runtime::data::watch::Watch;
use runtime::http::conditional::{self, ETag, FinalTags};
use runtime::http::idempotency::{self, Claim, IdempotencyKeyHeader};
use runtime::http::responses::{NotAuthenticated, UnexpectedError};
use runtime::messaging::consumer::{HandlerError, HandlerResult};
use runtime::{ApiError, Incoming, Json, Page, Path, Query};

use crate::OUTBOX;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;
use uuid::Uuid;

/// An order as stored: the query macros check its columns against the table.
struct OrderRow {
    id: Uuid,
    price: Money,
    status: OrderStatus,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<OrderRow> for Order {
    fn from(r: OrderRow) -> Order {
        Order {
            id: r.id,
            price: r.price,
            status: r.status,
            reason: r.reason,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    pub db: PgPool,
    /// Long polls waiting for an order, by order id (see `watch::ORDER_CHANGED`).
    pub watch: Watch,
    pub idempotency_ttl: Duration,
    /// Orders per user a minute: each costs a payment and an e-mail.
    pub orders_rate: std::sync::Arc<runtime::http::PerUserRate>,
    /// The tags of settled orders read here, by (order, user): a settled
    /// order never changes again (only pending ones are ever updated), so
    /// its 304 needs no database; another user's request is never answered
    /// from here (it reads the database and gets the 404 of a missing order).
    pub final_tags: std::sync::Arc<FinalTags<(Uuid, Uuid)>>,
}

/// Settled orders whose tags a replica remembers at most (about 100 bytes each).
pub const FINAL_TAGS_CAPACITY: usize = 100_000;

/// The channel the `order_changed` trigger notifies with an order's id when
/// the order is placed or changes.
pub const ORDER_CHANGED: &str = "order_changed";

/// Where a client follows its orders as they settle: the push service's event
/// stream (a public path: the gateway serves it).
pub const ORDER_EVENTS: &str = "</api/v1/push/orders>; rel=\"monitor\"";

/// The `Retry-After` hint, in seconds, for a pending order's poller that
/// neither streams nor long-polls (settlement usually takes milliseconds).
const RETRY_AFTER_SECS: &str = "1";

/// A pending order says how to follow it: the event stream, or poll again
/// after `Retry-After` (or long-poll with `Prefer: wait`).
fn how_to_follow(resp: &mut Response, order: &Order) {
    if order.status == OrderStatus::Pending {
        resp.headers_mut().insert(header::LINK, HeaderValue::from_static(ORDER_EVENTS));
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
}

fn accepted(order: Order) -> Response {
    let location = HeaderValue::from_str(&format!("/api/v1/orders/{}", order.id)).expect("ASCII");
    let mut resp = (StatusCode::ACCEPTED, Json(&order)).into_response();
    resp.headers_mut().insert(header::LOCATION, location);
    how_to_follow(&mut resp, &order);
    resp
}

/// The tag of a user's order list: its version, bumped by every order placed
/// or settled (the `order_changed` trigger). Every page of the list is
/// determined by it.
fn list_tag(version: i64) -> ETag {
    ETag::new(format!("orders-{version}"))
}

#[utoipa::path(post, path = "/api/v1/orders", tag = "ordering", operation_id = "createOrder",
    request_body = CreateOrder,
    params(
        IdempotencyKeyHeader,
        ("If-Match" = Option<String>, Header,
            description = "The order list's ETag (from `GET /orders`): the order is placed only if the list has not \
                           changed since (a second click on a page that showed that list gets 412)"),
    ),
    responses(
        (status = 202, description = "Accepted: the order is pending until billing answers; follow it at its Location \
                                      (long poll with `Prefer: wait`), on the event stream in Link, or poll after Retry-After",
            body = Order, headers(
                ("Location" = String, description = "The order's URL"),
                ("Link" = String, description = "The event stream of the user's orders, `rel=\"monitor\"`"),
                ("Retry-After" = u32, description = "Seconds before polling the order again is worth it"),
            )),
        (status = 400, description = "Invalid Idempotency-Key", body = ErrorBody),
        NotAuthenticated,
        (status = 412, description = "If-Match does not name the order list's current ETag: the list changed", body = ErrorBody),
        (status = 422, description = "Invalid price, or an Idempotency-Key used for another price", body = ErrorBody),
        (status = 429, description = "Too many orders from this user", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        UnexpectedError,
    ))]
pub async fn create(
    State(app): State<App>,
    user: CurrentUser,
    headers: HeaderMap,
    Json(body): Json<CreateOrder>,
) -> Result<Response, ApiError> {
    app.orders_rate.check(user.id)?;
    let key = idempotency::Key::from_headers(&headers)?;
    let id = Uuid::now_v7();
    let payment = CreatePayment { id, user_id: user.id, amount: body.price };
    if key.is_none() && !headers.contains_key(header::IF_MATCH) {
        // Nothing to check first: the order and its outbox row in one
        // statement, one round trip and one commit.
        let row = insert(&app.db, id, user.id, body.price, &payment).await?;
        tracing::info!(order_id = %id, user_id = %user.id, price = %body.price, "order placed");
        return Ok(accepted(Order::from(row)));
    }
    let mut tx = app.db.begin().await?;
    if let Some(key) = &key {
        let request = idempotency::Request {
            scope: "order",
            user: user.id,
            key,
            request: format!("price={}", body.price.as_decimal().normalize()),
            outcome: serde_json::json!({ "orderId": id }),
            conflict: "this Idempotency-Key was used for an order with another price",
        };
        if let Claim::Repeat(outcome) = idempotency::claim(&mut tx, request, app.idempotency_ttl).await? {
            tx.rollback().await?;
            let first = outcome["orderId"].as_str().and_then(|id| id.parse().ok());
            let first = first.ok_or_else(|| ApiError::internal(anyhow::anyhow!("order key without an order id")))?;
            let order = read(&app.db, first, user.id).await?.ok_or_else(|| ApiError::not_found("order not found"))?;
            tracing::info!(order_id = %order.id, user_id = %user.id, "order request repeated; answering with its order");
            return Ok(accepted(order));
        }
    }
    if headers.contains_key(header::IF_MATCH) {
        // The list's version row, locked: a concurrent placement waits here and
        // then sees the version this one's order bumps.
        sqlx::query!("INSERT INTO order_list_versions (user_id) VALUES ($1) ON CONFLICT DO NOTHING", user.id)
            .execute(&mut *tx)
            .await?;
        let version =
            sqlx::query_scalar!("SELECT version FROM order_list_versions WHERE user_id = $1 FOR UPDATE", user.id)
                .fetch_one(&mut *tx)
                .await?;
        if list_tag(version).if_match(&headers) == Some(false) {
            tracing::info!(user_id = %user.id, "order refused: the list changed since the client read it");
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "the order list changed since it was read (If-Match): read it again before placing this order",
            ));
        }
    }
    let row = insert(&mut *tx, id, user.id, body.price, &payment).await?;
    tx.commit().await?;
    tracing::info!(order_id = %id, user_id = %user.id, price = %body.price, "order placed");
    Ok(accepted(Order::from(row)))
}

/// Inserts the order and, in the same statement, the `CreatePayment` that
/// asks billing for it into the outbox: both or neither, inside a
/// transaction or alone.
async fn insert<'c>(
    db: impl sqlx::PgExecutor<'c>,
    id: Uuid,
    user: Uuid,
    price: Money,
    payment: &CreatePayment,
) -> sqlx::Result<OrderRow> {
    let message = OUTBOX.row(payment)?;
    sqlx::query_as!(
        OrderRow,
        r#"WITH placed AS (
               INSERT INTO orders (id, user_id, price) VALUES ($1, $2, $3)
               RETURNING id, price, status, reason, created_at, updated_at
           ), queued AS (
               INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, payload, headers)
               VALUES ($4, $5, $6, $7, $8, $9, $10)
           )
           SELECT id AS "id!", price AS "price!: Money", status AS "status!: OrderStatus", reason AS "reason?",
                  created_at AS "created_at!", updated_at AS "updated_at!"
           FROM placed"#,
        id,
        user,
        price as Money,
        message.message_id,
        message.exchange,
        message.routing_key,
        message.message_type,
        message.correlation_id,
        message.payload,
        message.headers,
    )
    .fetch_one(db)
    .await
}

#[utoipa::path(get, path = "/api/v1/orders", tag = "ordering", operation_id = "getOrders",
    params(Page,
        ("If-None-Match" = Option<String>, Header, description = "The ETag of the copy the client has: 304 if it is current"),
    ),
    responses(
        (status = 200, description = "The user's orders, newest first", body = Vec<Order>, headers(
            ("ETag" = String, description = "The tag of the user's order list: changes when an order is placed or settled; \
                                             `If-Match` on `POST /orders` takes it"),
            ("Cache-Control" = String, description = "`private, no-cache`"),
        )),
        (status = 304, description = "Not modified: the client's copy (If-None-Match) is current", headers(
            ("ETag" = String, description = "The tag of the user's order list"),
        )),
        (status = 400, description = "Invalid limit or cursor", body = ErrorBody),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn list(
    State(app): State<App>,
    user: CurrentUser,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit()?.get();
    // The version first: a page read after it is at least as new as it says.
    let version = sqlx::query_scalar!("SELECT version FROM order_list_versions WHERE user_id = $1", user.id)
        .fetch_optional(&app.db)
        .await?;
    let tag = list_tag(version.unwrap_or(0));
    if tag.none_match_hit(&headers) {
        return Ok(conditional::not_modified(&tag));
    }
    // Newest first, older than the order `before` (see `Page`).
    let rows = sqlx::query_as!(
        OrderRow,
        r#"SELECT id, price AS "price: Money", status AS "status: OrderStatus", reason, created_at, updated_at
           FROM orders WHERE user_id = $1
             AND ($2::uuid IS NULL OR (created_at, id) < (SELECT created_at, id FROM orders WHERE id = $2 AND user_id = $1))
           ORDER BY created_at DESC, id DESC LIMIT $3"#,
        user.id,
        page.before,
        limit,
    )
    .fetch_all(&app.db)
    .await?;
    let orders: Vec<Order> = rows.into_iter().map(Order::from).collect();
    Ok(conditional::json_or_not_modified(&headers, Some(tag), &orders)?.1)
}

async fn read(db: &PgPool, id: Uuid, user: Uuid) -> Result<Option<Order>, ApiError> {
    let row = sqlx::query_as!(
        OrderRow,
        r#"SELECT id, price AS "price: Money", status AS "status: OrderStatus", reason, created_at, updated_at
           FROM orders WHERE id = $1 AND user_id = $2"#,
        id,
        user,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(Order::from))
}

/// The order with its tag, or 304, and for a pending one how to follow it;
/// a settled one is final (its tag remembered here, and at the gateway).
fn order_response(app: &App, user: Uuid, headers: &HeaderMap, order: &Order) -> Result<(ETag, Response), ApiError> {
    let (tag, mut resp) = conditional::json_or_not_modified(headers, None, order)?;
    how_to_follow(&mut resp, order);
    if order.status != OrderStatus::Pending {
        app.final_tags.insert((order.id, user), tag.clone());
        resp.headers_mut().insert(conditional::FINAL, HeaderValue::from_static("1"));
    }
    Ok((tag, resp))
}

/// Another user's order is answered exactly like a missing one. With
/// `Prefer: wait=N`, a pending order's answer waits until the order changes
/// (woken by its settlement, on whichever replica it happens) or N seconds
/// pass; shutdown ends the wait at once.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "ordering", operation_id = "getOrder",
    params(("id" = Uuid, Path, description = "The order id"),
        ("If-None-Match" = Option<String>, Header, description = "The ETag of the copy the client has: 304 if it is current \
                                                                   (after the wait, with `Prefer: wait`)"),
        ("Prefer" = Option<String>, Header, example = "wait=30",
            description = "`wait=N` (RFC 7240): for a pending order, answer when it changes or after N seconds \
                           (at most 30), whichever comes first: a long poll"),
    ),
    responses(
        (status = 200, description = "The order", body = Order, headers(
            ("ETag" = String, description = "The tag of the order: changes when its status, reason or update time does"),
            ("Cache-Control" = String, description = "`private, no-cache`"),
            ("Preference-Applied" = String, description = "`wait=N` when the long poll was honoured (N capped at 30)"),
            ("Link" = String, description = "A pending order: the event stream of the user's orders, `rel=\"monitor\"`"),
            ("Retry-After" = u32, description = "A pending order: seconds before polling again is worth it"),
        )),
        (status = 304, description = "Not modified: the client's copy (If-None-Match) is current, also after the wait", headers(
            ("ETag" = String, description = "The tag of the order"),
            ("Preference-Applied" = String, description = "`wait=N` when the long poll was honoured"),
        )),
        (status = 400, description = "Not an order id", body = ErrorBody),
        NotAuthenticated,
        (status = 404, description = "No such order of this user", body = ErrorBody),
        UnexpectedError,
    ))]
pub async fn get_one(
    State(app): State<App>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // The client's copy of a settled order is current and stays so (there
    // is nothing to wait for): no need to read it again.
    if let Some(mut resp) = app.final_tags.not_modified(&(id, user.id), &headers) {
        metrics::counter!("ordering_final_tag_hits_total").increment(1);
        resp.headers_mut().insert(conditional::FINAL, HeaderValue::from_static("1"));
        return Ok(resp);
    }
    let wait = conditional::prefer_wait(&headers);
    // Registered before the read, so that a settlement committed in between wakes it.
    let mut watcher = wait.map(|_| app.watch.watch(id.to_string()));
    let mut order = read(&app.db, id, user.id).await?.ok_or_else(|| ApiError::not_found("order not found"))?;
    let (tag, resp) = order_response(&app, user.id, &headers, &order)?;
    let (Some(wait), Some(watcher)) = (wait, watcher.as_mut()) else { return Ok(resp) };
    // Nothing to wait for: a settled order never changes again, and a client
    // whose copy is stale needs the current one now.
    let stale = headers.contains_key(header::IF_NONE_MATCH) && resp.status() != StatusCode::NOT_MODIFIED;
    if order.status != OrderStatus::Pending || stale {
        return Ok(resp);
    }
    drop(resp);
    let deadline = tokio::time::Instant::now() + wait;
    tracing::debug!(order_id = %id, wait_secs = wait.as_secs(), "long poll");
    // Counted in `orders_long_polls_waiting{database}` while it waits, until
    // it answers or its client goes away (the request is dropped): what is
    // parked now, for operators and for tests that must know a poll waits.
    let label = runtime::metrics::database_label(&app.db);
    let _waiting = runtime::metrics::GaugeGuard::new(metrics::gauge!("orders_long_polls_waiting", "database" => label));
    loop {
        tokio::select! {
            woken = watcher.changed() => if !woken { break },
            _ = tokio::time::sleep_until(deadline) => break,
        }
        order = read(&app.db, id, user.id).await?.ok_or_else(|| ApiError::not_found("order not found"))?;
        if conditional::tag_of(&order)? != tag {
            break;
        }
    }
    let (_, mut resp) = order_response(&app, user.id, &headers, &order)?;
    let (name, value) = conditional::preference_applied(wait);
    resp.headers_mut().insert(name, value);
    Ok(resp)
}

/// Moves a pending order to its final status; `None` when the payment is not
/// an order's, or the order is already settled (a repeated answer).
async fn settle(
    tx: &mut PgConnection,
    id: Uuid,
    status: OrderStatus,
    reason: Option<&str>,
) -> Result<Option<(Uuid, Money)>, HandlerError> {
    let row = sqlx::query!(
        r#"UPDATE orders SET status = $2, reason = $3, updated_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING user_id, price, extract(epoch FROM now() - created_at)::float8 AS "waited!""#,
        id,
        status as OrderStatus,
        reason,
    )
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| (r.user_id, r.price, r.waited));
    match row {
        Some((user_id, price, waited)) => {
            let price = Money::new(price).map_err(|e| HandlerError::Reject(e.to_string()))?;
            // From placement to billing's answer. (A commit that fails after
            // this is retried and counted again: rare, and only inflates the count.)
            metrics::histogram!("order_settlement_duration_seconds", "status" => status.as_str())
                .record(waited.max(0.0));
            tracing::info!(order_id = %id, user_id = %user_id, status = status.as_str(), "order settled");
            Ok(Some((user_id, price)))
        }
        None => {
            tracing::info!(order_id = %id, "no pending order for this payment; ignored");
            Ok(None)
        }
    }
}

pub async fn on_payment_created(tx: &mut PgConnection, msg: Incoming<PaymentCreated>) -> HandlerResult {
    let order_id = msg.payload.id;
    if let Some((user_id, price)) = settle(tx, order_id, OrderStatus::Succeeded, None).await? {
        OUTBOX.enqueue(tx, &OrderCreated { order_id, user_id, price, occurred_at: Utc::now() }).await?;
    }
    Ok(())
}

pub async fn on_payment_failed(tx: &mut PgConnection, msg: Incoming<PaymentFailed>) -> HandlerResult {
    let PaymentFailed { id: order_id, reason } = msg.payload;
    if let Some((user_id, price)) = settle(tx, order_id, OrderStatus::Failed, Some(&reason)).await? {
        OUTBOX.enqueue(tx, &OrderFailed { order_id, user_id, price, reason, occurred_at: Utc::now() }).await?;
    }
    Ok(())
}

/// Sets `orders_pending` (orders waiting for billing's answer) and
/// `orders_pending_oldest_age_seconds` (0 when none waits) from the database:
/// an order stuck in `pending` shows here whatever the reason (billing down,
/// a message lost or dead-lettered). The partial index `orders_pending`
/// keeps this a scan of the orders in flight only.
pub async fn report_pending(db: &PgPool) -> sqlx::Result<()> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "count!", extract(epoch FROM now() - min(created_at))::float8 AS oldest
         FROM orders WHERE status = 'pending'"#,
    )
    .fetch_one(db)
    .await?;
    let (count, oldest) = (row.count, row.oldest);
    let database = runtime::metrics::database_label(db);
    metrics::gauge!("orders_pending", "database" => database.clone()).set(count as f64);
    metrics::gauge!("orders_pending_oldest_age_seconds", "database" => database).set(oldest.unwrap_or(0.0).max(0.0));
    Ok(())
}
