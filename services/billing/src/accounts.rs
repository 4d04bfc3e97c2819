//! The account of the calling user: read, deposit, withdraw.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use contracts::api::{BillingAccount, BillingUpdate, ErrorBody};
use contracts::messages::{NOT_ENOUGH_MONEY, UserCreated};
use runtime::auth::CurrentUser;
use runtime::consumer::HandlerResult;
use runtime::http::responses::{NotAuthenticated, UnexpectedError};
use runtime::{ApiError, Incoming, Json};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Opens the account if it does not exist yet (balance 0).
pub async fn ensure_account(conn: &mut PgConnection, user_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO accounts (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(user_id)
        .execute(conn)
        .await?;
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
    let entered = sqlx::query(
        "WITH moved AS (
             UPDATE accounts SET balance = balance - $2, updated_at = now()
             WHERE user_id = $1 AND balance >= $2 RETURNING balance)
         INSERT INTO ledger_entries (user_id, kind, source, payment_id, amount, balance_after)
         SELECT $1, $3, $4, $5, -$2, balance FROM moved",
    )
    .bind(user_id)
    .bind(amount)
    .bind(kind)
    .bind(source)
    .bind(payment_id)
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
pub async fn get_account(State(db): State<PgPool>, user: CurrentUser) -> Result<Json<BillingAccount>, ApiError> {
    let mut conn = db.acquire().await?;
    ensure_account(&mut conn, user.id).await?;
    let (amount, created_at, updated_at) =
        sqlx::query_as("SELECT balance, created_at, updated_at FROM accounts WHERE user_id = $1")
            .bind(user.id)
            .fetch_one(&mut *conn)
            .await?;
    Ok(Json(BillingAccount { amount, created_at, updated_at }))
}

#[utoipa::path(post, path = "/api/v1/account/deposit", tag = "billing", operation_id = "depositMoney",
    request_body = BillingUpdate,
    responses(
        (status = 204, description = "Deposited"),
        NotAuthenticated,
        (status = 422, description = "Invalid amount, or the balance would exceed the maximum", body = ErrorBody),
        UnexpectedError,
    ))]
pub async fn deposit(
    State(db): State<PgPool>,
    user: CurrentUser,
    headers: HeaderMap,
    Json(body): Json<BillingUpdate>,
) -> Result<StatusCode, ApiError> {
    // The balance change and its ledger entry in one statement.
    let result = sqlx::query(
        "WITH moved AS (
             INSERT INTO accounts (user_id, balance) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET balance = accounts.balance + EXCLUDED.balance, updated_at = now()
             RETURNING balance)
         INSERT INTO ledger_entries (user_id, kind, source, amount, balance_after)
         SELECT $1, 'deposit', $3, $2, balance FROM moved",
    )
    .bind(user.id)
    .bind(body.amount.as_decimal())
    .bind(request_source(&headers))
    .execute(&db)
    .await;
    match result {
        Ok(_) => {
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
    responses(
        (status = 204, description = "Withdrawn"),
        NotAuthenticated,
        (status = 422, description = "Invalid amount, or not enough money", body = ErrorBody),
        UnexpectedError,
    ))]
pub async fn withdraw(
    State(db): State<PgPool>,
    user: CurrentUser,
    headers: HeaderMap,
    Json(body): Json<BillingUpdate>,
) -> Result<StatusCode, ApiError> {
    let mut conn = db.acquire().await?;
    ensure_account(&mut conn, user.id).await?;
    if !debit(&mut conn, user.id, body.amount.as_decimal(), Debit::Withdrawal, &request_source(&headers)).await? {
        return Err(ApiError::unprocessable(NOT_ENOUGH_MONEY));
    }
    tracing::info!(user_id = %user.id, amount = %body.amount, "withdrawal");
    Ok(StatusCode::NO_CONTENT)
}
