//! Placing, listing and polling orders, and settling them when billing answers.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use contracts::Money;
use contracts::api::{CreateOrder, ErrorBody, Order, OrderStatus};
use contracts::messages::{CreatePayment, OrderCreated, OrderFailed, PaymentCreated, PaymentFailed};
use runtime::auth::CurrentUser;
use runtime::consumer::{HandlerError, HandlerResult};
use runtime::http::responses::{NotAuthenticated, UnexpectedError};
use runtime::{ApiError, Incoming, Json, Page, Path, Query, outbox};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

const COLUMNS: &str = "id, price, status, reason, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    price: Decimal,
    status: String,
    reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<OrderRow> for Order {
    type Error = ApiError;
    fn try_from(r: OrderRow) -> Result<Order, ApiError> {
        let status = match r.status.as_str() {
            "pending" => OrderStatus::Pending,
            "succeeded" => OrderStatus::Succeeded,
            "failed" => OrderStatus::Failed,
            other => {
                return Err(ApiError::internal(anyhow::anyhow!("unknown order status {other}")));
            }
        };
        let price = Money::new(r.price).map_err(ApiError::internal)?;
        Ok(Order { id: r.id, price, status, reason: r.reason, created_at: r.created_at, updated_at: r.updated_at })
    }
}

/// The optional `Idempotency-Key` of a request: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(key.into())),
        _ => Err(ApiError::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")),
    }
}

fn accepted(order: Order) -> Response {
    let location = HeaderValue::from_str(&format!("/api/v1/orders/{}", order.id)).expect("ASCII");
    let mut resp = (StatusCode::ACCEPTED, Json(order)).into_response();
    resp.headers_mut().insert(header::LOCATION, location);
    resp
}

#[utoipa::path(post, path = "/api/v1/orders", tag = "ordering", operation_id = "createOrder",
    request_body = CreateOrder,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[\x21-\x7E]+$",
        description = "Makes a retry safe: the same key (for this user) gets the order the first request placed")),
    responses(
        (status = 202, description = "Accepted: the order is pending until billing answers; poll its Location or listen on the event stream",
            body = Order, headers(("Location" = String, description = "The order's URL"))),
        (status = 400, description = "Invalid Idempotency-Key", body = ErrorBody),
        NotAuthenticated,
        (status = 422, description = "Invalid price, or an Idempotency-Key used for another price", body = ErrorBody),
        UnexpectedError,
    ))]
pub async fn create(
    State(db): State<PgPool>,
    user: CurrentUser,
    headers: HeaderMap,
    Json(body): Json<CreateOrder>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let id = Uuid::now_v7();
    let mut tx = db.begin().await?;
    let row: OrderRow =
        sqlx::query_as(&format!("INSERT INTO orders (id, user_id, price) VALUES ($1, $2, $3) RETURNING {COLUMNS}"))
            .bind(id)
            .bind(user.id)
            .bind(body.price.as_decimal())
            .fetch_one(&mut *tx)
            .await?;
    if let Some(key) = &key {
        // A concurrent request with the same key waits here for the first to
        // commit, then finds its order.
        let first = sqlx::query(
            "INSERT INTO order_requests (user_id, idempotency_key, order_id, price) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(user.id)
        .bind(key)
        .bind(id)
        .bind(body.price.as_decimal())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first {
            tx.rollback().await?;
            return repeated(&db, user.id, key, body.price).await;
        }
    }
    outbox::enqueue(&mut tx, &CreatePayment { id, user_id: user.id, amount: body.price }).await?;
    tx.commit().await?;
    tracing::info!(order_id = %id, user_id = %user.id, price = %body.price, "order placed");
    Ok(accepted(Order::try_from(row)?))
}

/// The answer to a request whose Idempotency-Key was seen: the order it placed.
async fn repeated(db: &PgPool, user: Uuid, key: &str, price: Money) -> Result<Response, ApiError> {
    let row: OrderRow = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM orders WHERE id =
             (SELECT order_id FROM order_requests WHERE user_id = $1 AND idempotency_key = $2)"
    ))
    .bind(user)
    .bind(key)
    .fetch_one(db)
    .await?;
    if row.price != price.as_decimal() {
        return Err(ApiError::unprocessable("this Idempotency-Key was used for an order with another price"));
    }
    tracing::info!(order_id = %row.id, user_id = %user, "order request repeated; answering with its order");
    Ok(accepted(Order::try_from(row)?))
}

#[utoipa::path(get, path = "/api/v1/orders", tag = "ordering", operation_id = "getOrders",
    params(Page),
    responses(
        (status = 200, description = "The user's orders, newest first", body = Vec<Order>),
        (status = 400, description = "Invalid limit or cursor", body = ErrorBody),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn list(
    State(db): State<PgPool>,
    user: CurrentUser,
    Query(page): Query<Page>,
) -> Result<Json<Vec<Order>>, ApiError> {
    let rows: Vec<OrderRow> = sqlx::query_as(&Page::sql("orders", COLUMNS))
        .bind(user.id)
        .bind(page.before)
        .bind(page.limit()?)
        .fetch_all(&db)
        .await?;
    Ok(Json(rows.into_iter().map(Order::try_from).collect::<Result<_, _>>()?))
}

/// Another user's order is answered exactly like a missing one.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "ordering", operation_id = "getOrder",
    params(("id" = Uuid, Path, description = "The order id")),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 400, description = "Not an order id", body = ErrorBody),
        NotAuthenticated,
        (status = 404, description = "No such order of this user", body = ErrorBody),
        UnexpectedError,
    ))]
pub async fn get_one(
    State(db): State<PgPool>,
    user: CurrentUser,
    Path(id): Path<Uuid>,
) -> Result<Json<Order>, ApiError> {
    let row: Option<OrderRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1 AND user_id = $2"))
        .bind(id)
        .bind(user.id)
        .fetch_optional(&db)
        .await?;
    Ok(Json(row.ok_or_else(|| ApiError::not_found("order not found"))?.try_into()?))
}

/// Moves a pending order to its final status; `None` when the payment is not
/// an order's, or the order is already settled (a repeated answer).
async fn settle(
    tx: &mut PgConnection,
    id: Uuid,
    status: OrderStatus,
    reason: Option<&str>,
) -> Result<Option<(Uuid, Money)>, HandlerError> {
    let row: Option<(Uuid, Decimal, f64)> = sqlx::query_as(
        "UPDATE orders SET status = $2, reason = $3, updated_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING user_id, price, extract(epoch FROM now() - created_at)::float8",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
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
        outbox::enqueue(tx, &OrderCreated { order_id, user_id, price, occurred_at: Utc::now() }).await?;
    }
    Ok(())
}

pub async fn on_payment_failed(tx: &mut PgConnection, msg: Incoming<PaymentFailed>) -> HandlerResult {
    let PaymentFailed { id: order_id, reason } = msg.payload;
    if let Some((user_id, price)) = settle(tx, order_id, OrderStatus::Failed, Some(&reason)).await? {
        outbox::enqueue(tx, &OrderFailed { order_id, user_id, price, reason, occurred_at: Utc::now() }).await?;
    }
    Ok(())
}

/// Sets `orders_pending` (orders waiting for billing's answer) and
/// `orders_pending_oldest_age_seconds` (0 when none waits) from the database:
/// an order stuck in `pending` shows here whatever the reason (billing down,
/// a message lost or dead-lettered). The partial index `orders_pending`
/// keeps this a scan of the orders in flight only.
pub async fn report_pending(db: &PgPool) -> sqlx::Result<()> {
    let (count, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8
         FROM orders WHERE status = 'pending'",
    )
    .fetch_one(db)
    .await?;
    let database = runtime::metrics::database_label(db);
    metrics::gauge!("orders_pending", "database" => database.clone()).set(count as f64);
    metrics::gauge!("orders_pending_oldest_age_seconds", "database" => database).set(oldest.unwrap_or(0.0).max(0.0));
    Ok(())
}
