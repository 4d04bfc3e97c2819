//! The account of the calling user: read, deposit, withdraw.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use contracts::Money;
use contracts::api::{BillingAccount, BillingUpdate, ErrorBody};
use contracts::messages::{NOT_ENOUGH_MONEY, UserCreated};
use runtime::auth::CurrentUser;
use runtime::http::idempotency::{self, Claim, IdempotencyKeyHeader};
use runtime::http::responses::{NotAuthenticated, UnexpectedError};
use runtime::messaging::consumer::HandlerResult;
use runtime::{ApiError, Incoming, Json};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;
use uuid::Uuid;

/// Opens the account if it does not exist yet (balance 0).
pub async fn ensure_account(conn: &mut PgConnection, user_id: Uuid) -> sqlx::Result<()> {
    sqlx::query!("INSERT INTO accounts (user_id) VALUES ($1) ON CONFLICT DO NOTHING", user_id).execute(conn).await?;
    Ok(())
}

/// What a debit is, for its ledger entry.
pub enum Debit {
    Withdrawal,
    Payment(Uuid),
}

/// Takes `amount` from the account if the balance covers it and appends the
/// ledger entry, in one statement (a data-modifying CTE): concurrent debits
/// can never overdraw, and a balance never changes without its entry.
/// `source` says where it came from (see [`request_source`]).
pub async fn debit(
    conn: &mut PgConnection,
    user_id: Uuid,
    amount: Decimal,
    what: Debit,
    source: &str,
) -> sqlx::Result<bool> {
    let (kind, payment_id) = match what {
        Debit::Withdrawal => ("withdrawal", None),
        Debit::Payment(id) => ("payment", Some(id)),
    };
    let entered = sqlx::query!(
        "WITH moved AS (
             UPDATE accounts SET balance = balance - $2, updated_at = now()
             WHERE user_id = $1 AND balance >= $2 RETURNING balance)
         INSERT INTO ledger_entries (user_id, kind, source, payment_id, amount, balance_after)
         SELECT $1, $3, $4, $5, -$2, balance FROM moved",
        user_id,
        amount,
        kind,
        source,
        payment_id,
    )
    .execute(conn)
    .await?
    .rows_affected();
    Ok(entered == 1)
}

/// The ledger source of a REST call: its `X-Request-Id` (set by the gateway
/// or by this service's request-id layer for every request).
pub fn request_source(headers: &HeaderMap) -> String {
    let id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    format!("request:{id}")
}

pub async fn on_user_created(tx: &mut PgConnection, msg: Incoming<UserCreated>) -> HandlerResult {
    ensure_account(tx, msg.payload.id).await?;
    tracing::info!(user_id = %msg.payload.id, "account ready");
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/account", tag = "billing", operation_id = "getBillingAccount",
    responses(
        (status = 200, description = "The user's account (opened with 0 on first use)", body = BillingAccount),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn get_account(
    State(App { db, .. }): State<App>,
    user: CurrentUser,
) -> Result<Json<BillingAccount>, ApiError> {
    let mut conn = db.acquire().await?;
    ensure_account(&mut conn, user.id).await?;
    let account = sqlx::query_as!(
        BillingAccount,
        "SELECT balance AS amount, created_at, updated_at FROM accounts WHERE user_id = $1",
        user.id,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Json(account))
}

/// What deposits and withdrawals share.
#[derive(Clone)]
pub struct App {
    pub db: PgPool,
    pub idempotency_ttl: Duration,
    /// Deposits and withdrawals per user a minute: each is a ledger entry.
    pub deposits: std::sync::Arc<runtime::http::PerUserRate>,
    pub withdrawals: std::sync::Arc<runtime::http::PerUserRate>,
}

/// Claims the request's Idempotency-Key, if it sent one, in `tx`: `true` when
/// this is a repeat of a movement already applied (answer it as then: 204).
async fn repeated(
    app: &App,
    tx: &mut PgConnection,
    headers: &HeaderMap,
    user: Uuid,
    scope: &'static str,
    amount: Money,
) -> Result<bool, ApiError> {
    let Some(key) = idempotency::Key::from_headers(headers)? else { return Ok(false) };
    let request = idempotency::Request {
        scope,
        user,
        key: &key,
        request: format!("amount={}", amount.as_decimal().normalize()),
        outcome: serde_json::Value::Null,
        conflict: "this Idempotency-Key was used for a request with another amount",
    };
    Ok(matches!(idempotency::claim(tx, request, app.idempotency_ttl).await?, Claim::Repeat(_)))
}

#[utoipa::path(post, path = "/api/v1/account/deposit", tag = "billing", operation_id = "depositMoney",
    request_body = BillingUpdate,
    params(IdempotencyKeyHeader),
    responses(
        (status = 204, description = "Deposited (or deposited before, under this Idempotency-Key)"),
        (status = 400, description = "Invalid Idempotency-Key", body = ErrorBody),
        NotAuthenticated,
        (status = 422, description = "Invalid amount, the balance would exceed the maximum, or an Idempotency-Key \
                                      used for another amount", body = ErrorBody),
        (status = 429, description = "Too many deposits from this user", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        UnexpectedError,
    ))]
pub async fn deposit(
    State(app): State<App>,
    user: CurrentUser,
    headers: HeaderMap,
    Json(body): Json<BillingUpdate>,
) -> Result<StatusCode, ApiError> {
    app.deposits.check(user.id)?;
    let mut tx = app.db.begin().await?;
    if repeated(&app, &mut tx, &headers, user.id, "deposit", body.amount).await? {
        return Ok(StatusCode::NO_CONTENT);
    }
    // The balance change and its ledger entry in one statement.
    let result = sqlx::query!(
        "WITH moved AS (
             INSERT INTO accounts (user_id, balance) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET balance = accounts.balance + EXCLUDED.balance, updated_at = now()
             RETURNING balance)
         INSERT INTO ledger_entries (user_id, kind, source, amount, balance_after)
         SELECT $1, 'deposit', $3, $2, balance FROM moved",
        user.id,
        body.amount as Money,
        request_source(&headers),
    )
    .execute(&mut *tx)
    .await;
    match result {
        Ok(_) => {
            tx.commit().await?;
            tracing::info!(user_id = %user.id, amount = %body.amount, "deposit");
            Ok(StatusCode::NO_CONTENT)
        }
        // numeric_value_out_of_range: the balance would not fit NUMERIC(14,2).
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("22003") => {
            Err(ApiError::unprocessable("the balance would exceed the largest amount an account can hold"))
        }
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(post, path = "/api/v1/account/withdraw", tag = "billing", operation_id = "withdrawMoney",
    request_body = BillingUpdate,
    params(IdempotencyKeyHeader),
    responses(
        (status = 204, description = "Withdrawn (or withdrawn before, under this Idempotency-Key)"),
        (status = 400, description = "Invalid Idempotency-Key", body = ErrorBody),
        NotAuthenticated,
        (status = 422, description = "Invalid amount, not enough money, or an Idempotency-Key used for another amount",
            body = ErrorBody),
        (status = 429, description = "Too many withdrawals from this user", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        UnexpectedError,
    ))]
pub async fn withdraw(
    State(app): State<App>,
    user: CurrentUser,
    headers: HeaderMap,
    Json(body): Json<BillingUpdate>,
) -> Result<StatusCode, ApiError> {
    app.withdrawals.check(user.id)?;
    let mut tx = app.db.begin().await?;
    if repeated(&app, &mut tx, &headers, user.id, "withdrawal", body.amount).await? {
        return Ok(StatusCode::NO_CONTENT);
    }
    ensure_account(&mut tx, user.id).await?;
    // Refused: nothing happened, and the key is not kept (the transaction
    // rolls back), so a retry after a deposit can succeed.
    if !debit(&mut tx, user.id, body.amount.as_decimal(), Debit::Withdrawal, &request_source(&headers)).await? {
        return Err(ApiError::unprocessable(NOT_ENOUGH_MONEY));
    }
    tx.commit().await?;
    tracing::info!(user_id = %user.id, amount = %body.amount, "withdrawal");
    Ok(StatusCode::NO_CONTENT)
}
