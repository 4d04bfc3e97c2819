//! Profiles, notifications, and the list a user reads.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use contracts::api::{ErrorBody, Notification};
use contracts::messages::{NotificationCreated, OrderCreated, OrderFailed, UserCreated, UserUpdated};
use runtime::auth::CurrentUser;
use runtime::http::conditional;
use runtime::http::responses::{NotAuthenticated, UnexpectedError};
use runtime::messaging::consumer::HandlerResult;
use runtime::{ApiError, Incoming, Page, Query};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::OUTBOX;
use crate::mailer::EMAIL_CHANNEL;

/// Stores the profile copy unless the one held is newer (a higher version):
/// events of one user may be delivered, or retried, out of order.
async fn upsert_profile(
    tx: &mut PgConnection,
    id: Uuid,
    email: &str,
    first_name: &Option<String>,
    last_name: &Option<String>,
    phone: &Option<String>,
    version: i64,
) -> HandlerResult {
    let stored = sqlx::query!(
        "INSERT INTO profiles (user_id, email, first_name, last_name, phone, version) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, first_name = EXCLUDED.first_name,
             last_name = EXCLUDED.last_name, phone = EXCLUDED.phone, version = EXCLUDED.version, updated_at = now()
         WHERE profiles.version <= EXCLUDED.version",
        id,
        email,
        first_name.as_deref(),
        last_name.as_deref(),
        phone.as_deref(),
        version,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if stored == 0 {
        tracing::info!(user_id = %id, version, "profile event older than the copy held; ignored");
        return Ok(());
    }
    // E-mails that waited for this address can go now.
    sqlx::query!("SELECT pg_notify($1, '')", EMAIL_CHANNEL).fetch_one(&mut *tx).await?;
    tracing::info!(user_id = %id, version, "profile stored");
    Ok(())
}

pub async fn on_user_created(tx: &mut PgConnection, msg: Incoming<UserCreated>) -> HandlerResult {
    let u = msg.payload;
    upsert_profile(tx, u.id, &u.email, &u.first_name, &u.last_name, &u.phone, u.version).await
}

pub async fn on_user_updated(tx: &mut PgConnection, msg: Incoming<UserUpdated>) -> HandlerResult {
    let u = msg.payload;
    upsert_profile(tx, u.id, &u.email, &u.first_name, &u.last_name, &u.phone, u.version).await
}

/// Stores the notification, queues its e-mail and announces it
/// (`NotificationCreated`, for the user's open pages), in the consumer's
/// transaction.
async fn notify(tx: &mut PgConnection, user_id: Uuid, order_id: Uuid, subject: &str, message: String) -> HandlerResult {
    let id = Uuid::now_v7();
    let created_at = sqlx::query_scalar!(
        "INSERT INTO notifications (id, user_id, order_id, message) VALUES ($1, $2, $3, $4) RETURNING created_at",
        id,
        user_id,
        order_id,
        &message,
    )
    .fetch_one(&mut *tx)
    .await?;
    OUTBOX
        .enqueue(
            tx,
            &NotificationCreated { id, user_id, order_id: Some(order_id), message: message.clone(), created_at },
        )
        .await?;
    sqlx::query!(
        "INSERT INTO email_deliveries (notification_id, user_id, subject, body) VALUES ($1, $2, $3, $4)",
        id,
        user_id,
        subject,
        &message,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("SELECT pg_notify($1, '')", EMAIL_CHANNEL).fetch_one(&mut *tx).await?;
    crate::webpush::queue(tx, id, user_id, order_id, subject, &message).await?;
    tracing::info!(user_id = %user_id, order_id = %order_id, notification_id = %id, "notification stored");
    Ok(())
}

pub async fn on_order_created(tx: &mut PgConnection, msg: Incoming<OrderCreated>) -> HandlerResult {
    let o = msg.payload;
    let text = format!("Your order for {}$ has been successfully processed", o.price);
    notify(tx, o.user_id, o.order_id, "Your order has been processed", text).await
}

pub async fn on_order_failed(tx: &mut PgConnection, msg: Incoming<OrderFailed>) -> HandlerResult {
    let o = msg.payload;
    let text = format!("Your order for {}$ was not fulfilled due to: {}", o.price, o.reason);
    notify(tx, o.user_id, o.order_id, "Your order was not fulfilled", text).await
}

#[utoipa::path(get, path = "/api/v1/notifications", tag = "notifications", operation_id = "getNotifications",
    params(Page,
        ("If-None-Match" = Option<String>, Header, description = "The ETag of the copy the client has: 304 if it is current"),
    ),
    responses(
        (status = 200, description = "The user's notifications, newest first", body = Vec<Notification>, headers(
            ("ETag" = String, description = "The tag of this page: changes when a notification is added to it"),
            ("Cache-Control" = String, description = "`private, no-cache`"),
        )),
        (status = 304, description = "Not modified: the client's copy (If-None-Match) is current", headers(
            ("ETag" = String, description = "The tag of this page"),
        )),
        (status = 400, description = "Invalid limit or cursor", body = ErrorBody),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn list(
    State(db): State<PgPool>,
    user: CurrentUser,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    // Newest first, older than the notification `before` (see `Page`).
    let page = sqlx::query_as!(
        Notification,
        "SELECT id, message, created_at FROM notifications WHERE user_id = $1
           AND ($2::uuid IS NULL OR (created_at, id) < (SELECT created_at, id FROM notifications WHERE id = $2 AND user_id = $1))
         ORDER BY created_at DESC, id DESC LIMIT $3",
        user.id,
        page.before,
        page.limit()?.get(),
    )
    .fetch_all(&db)
    .await?;
    // The tag of the page as it is (a notification never changes once written).
    Ok(conditional::json_or_not_modified(&headers, None, &page)?.1)
}
