//! `CreatePayment` → charge the account → `PaymentCreated` or `PaymentFailed`;
//! `VoidPayment` → the payment's outcome, or a void that no later
//! `CreatePayment` can get past.
//!
//! A payment id has one outcome, whichever command arrives first and however
//! often either is repeated: the `payments` row, keyed by the id. A void
//! writes that row too (not charged, [`PAYMENT_VOIDED`]), so a void and a
//! charge of the same id racing on two consumers meet on its primary key:
//! the second waits for the first to commit and then answers with its outcome.

use contracts::Money;
use contracts::messages::{
    CreatePayment, NOT_ENOUGH_MONEY, PAYMENT_VOIDED, PaymentCreated, PaymentFailed, VoidPayment,
};
use runtime::Incoming;
use runtime::messaging::consumer::HandlerResult;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::OUTBOX;
use crate::accounts::{Debit, debit};

/// A payment's outcome as recorded: charged, or refused for a reason.
async fn outcome(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<(bool, Option<String>)>> {
    let row = sqlx::query!("SELECT succeeded, reason FROM payments WHERE id = $1", id).fetch_optional(&mut *tx).await?;
    Ok(row.map(|r| (r.succeeded, r.reason)))
}

/// Announces a payment's outcome (again, for a repeated command).
async fn answer(tx: &mut PgConnection, id: Uuid, succeeded: bool, reason: Option<String>) -> HandlerResult {
    if succeeded {
        OUTBOX.enqueue(tx, &PaymentCreated { id }).await?;
    } else {
        let reason = reason.unwrap_or_else(|| NOT_ENOUGH_MONEY.to_string());
        OUTBOX.enqueue(tx, &PaymentFailed { id, reason }).await?;
    }
    Ok(())
}

pub async fn on_create_payment(tx: &mut PgConnection, msg: Incoming<CreatePayment>) -> HandlerResult {
    let p = msg.payload;
    // The same payment asked again (under another message id, e.g. an order
    // re-driven by ordering's sweeper) gets the outcome it already had and is
    // not charged twice; a voided one stays refused.
    let (succeeded, reason) = match outcome(tx, p.id).await? {
        Some(outcome) => {
            tracing::info!(payment_id = %p.id, "payment already handled; repeating its outcome");
            outcome
        }
        None => {
            // No account to open first: the user's account exists from its
            // registration (`UserCreated`) or first deposit, and without one
            // the debit finds no balance that covers the (positive) amount,
            // which is the outcome a new, empty account would give.
            let source = format!("message:{}", msg.message_id);
            let charged = debit(tx, p.user_id, p.amount.as_decimal(), Debit::Payment(p.id), &source).await?;
            let reason = (!charged).then(|| NOT_ENOUGH_MONEY.to_string());
            // A void of this id committed since the read above makes this
            // insert fail (primary key): the transaction, debit included,
            // rolls back, and the retry finds the void.
            sqlx::query!(
                "INSERT INTO payments (id, user_id, amount, succeeded, reason) VALUES ($1, $2, $3, $4, $5)",
                p.id,
                p.user_id,
                p.amount as Money,
                charged,
                reason.as_deref(),
            )
            .execute(&mut *tx)
            .await?;
            tracing::info!(payment_id = %p.id, user_id = %p.user_id, amount = %p.amount, charged, "payment");
            (charged, reason)
        }
    };
    answer(tx, p.id, succeeded, reason).await
}

pub async fn on_void_payment(tx: &mut PgConnection, msg: Incoming<VoidPayment>) -> HandlerResult {
    let p = msg.payload;
    // The void's record, unless the payment has one already. A charge of the
    // same id in flight holds its row's key: this waits for it to commit (or
    // roll back) and then sees it.
    let voided = sqlx::query!(
        "INSERT INTO payments (id, user_id, amount, succeeded, reason) VALUES ($1, $2, $3, false, $4)
         ON CONFLICT (id) DO NOTHING",
        p.id,
        p.user_id,
        p.amount as Money,
        PAYMENT_VOIDED,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if voided {
        tracing::info!(payment_id = %p.id, user_id = %p.user_id, "payment voided before it was taken");
        return answer(tx, p.id, false, Some(PAYMENT_VOIDED.to_string())).await;
    }
    // The conflict means the row is there, committed (payments are never removed).
    let row = sqlx::query!("SELECT succeeded, reason FROM payments WHERE id = $1", p.id).fetch_one(&mut *tx).await?;
    let (succeeded, reason) = (row.succeeded, row.reason);
    tracing::info!(payment_id = %p.id, succeeded, "void of a payment already handled; repeating its outcome");
    answer(tx, p.id, succeeded, reason).await
}
