//! `CreatePayment` → charge the account → `PaymentCreated` or `PaymentFailed`.

use contracts::Money;
use contracts::messages::{CreatePayment, NOT_ENOUGH_MONEY, PaymentCreated, PaymentFailed};
use runtime::Incoming;
use runtime::consumer::HandlerResult;
use sqlx::PgConnection;

use crate::OUTBOX;
use crate::accounts::{Debit, debit};

pub async fn on_create_payment(tx: &mut PgConnection, msg: Incoming<CreatePayment>) -> HandlerResult {
    let p = msg.payload;
    // The same payment asked again (under another message id) gets the
    // outcome it already had, and is not charged twice.
    let previous = sqlx::query!("SELECT succeeded, reason FROM payments WHERE id = $1", p.id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| (r.succeeded, r.reason));
    let (succeeded, reason) = match previous {
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
    if succeeded {
        OUTBOX.enqueue(tx, &PaymentCreated { id: p.id }).await?;
    } else {
        let reason = reason.unwrap_or_else(|| NOT_ENOUGH_MONEY.to_string());
        OUTBOX.enqueue(tx, &PaymentFailed { id: p.id, reason }).await?;
    }
    Ok(())
}
