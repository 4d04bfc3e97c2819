//! The sweeper: no order stays pending for want of a message.
//!
//! An order pending past [`SweeperConfig::redrive_after`] had its
//! `CreatePayment` or billing's answer lost somewhere (a broker that dropped
//! it, a commit lost in a database failover after its message was acked):
//! the sweeper publishes its `CreatePayment` again, same payment id, through
//! the outbox. Billing answers a payment it already handled with the outcome
//! it had, so a re-drive never charges twice. An order pending past
//! [`SweeperConfig::pending_timeout`] gets a `VoidPayment` instead: billing
//! answers with the payment's outcome if it was taken (the order then
//! succeeds: a charged order is never failed), or records the void and
//! answers `PaymentFailed` ([`contracts::messages::PAYMENT_VOIDED`]), which
//! fails the order; a `CreatePayment` of that id arriving later is refused.
//! Either command is sent again every `redrive_after` until billing answers.
//!
//! Replicas: a sweep holds a transaction-level advisory lock, so one replica
//! sweeps at a time and the others skip that round; what a sweep sends is
//! recorded (`order_sweeps`) in the same transaction as its outbox rows.

use chrono::{DateTime, Utc};
use contracts::Money;
use contracts::messages::{CreatePayment, VoidPayment};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::OUTBOX;

/// When the sweeper re-drives and gives up on pending orders.
#[derive(clap::Args, Clone, Debug)]
pub struct SweeperConfig {
    /// An order still pending this long after it was placed gets its
    /// `CreatePayment` sent again, and again every as long while it stays
    /// pending (unless the last one is still waiting in the outbox).
    #[arg(long, env = "ORDERING_REDRIVE_AFTER_MS", default_value_t = 60_000)]
    pub redrive_after_ms: u64,

    /// An order still pending this long is given up: billing is asked to
    /// void its payment, and the order fails once billing confirms that
    /// nothing was taken (or succeeds, if it was).
    #[arg(long, env = "ORDERING_PENDING_TIMEOUT_MS", default_value_t = 900_000)]
    pub pending_timeout_ms: u64,

    /// How often the sweeper looks for such orders.
    #[arg(long, env = "ORDERING_SWEEP_INTERVAL_MS", default_value_t = 10_000)]
    pub sweep_interval_ms: u64,

    /// At most this many orders per sweep (the oldest first).
    #[arg(long, env = "ORDERING_SWEEP_BATCH", default_value_t = 500)]
    pub sweep_batch: u32,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        SweeperConfig {
            redrive_after_ms: 60_000,
            pending_timeout_ms: 900_000,
            sweep_interval_ms: 10_000,
            sweep_batch: 500,
        }
    }
}

impl SweeperConfig {
    pub fn redrive_after(&self) -> Duration {
        Duration::from_millis(self.redrive_after_ms)
    }

    pub fn pending_timeout(&self) -> Duration {
        Duration::from_millis(self.pending_timeout_ms)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms.max(1))
    }
}

/// What one sweep sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Orders whose `CreatePayment` was sent again.
    pub redriven: u32,
    /// Orders whose payment billing was asked to void.
    pub voided: u32,
}

/// The advisory lock a sweep holds: one replica sweeps at a time.
pub const SWEEP_LOCK: i64 = 0x6f72_6465_7273_7770; // "orderswp"

/// Sweeps every `interval` until shutdown; a failed sweep (the database away)
/// is logged and tried again at the next tick.
pub async fn run(db: PgPool, config: SweeperConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(config.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match sweep(&db, &config).await {
            Ok(Swept { redriven: 0, voided: 0 }) => {}
            Ok(s) => tracing::info!(redriven = s.redriven, voided = s.voided, "swept pending orders"),
            Err(e) => tracing::warn!(error = %e, "sweeping pending orders failed; trying again at the next sweep"),
        }
    }
}

/// One sweep: sends a `CreatePayment` (or, past the timeout, a
/// `VoidPayment`) for each order pending past the re-drive deadline whose
/// last command is older than that deadline too. Nothing when another
/// replica is sweeping.
pub async fn sweep(db: &PgPool, config: &SweeperConfig) -> sqlx::Result<Swept> {
    let mut tx = db.begin().await?;
    let locked = sqlx::query_scalar!(r#"SELECT pg_try_advisory_xact_lock($1) AS "locked!""#, SWEEP_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(Swept::default());
    }
    let redrive = config.redrive_after().as_secs_f64();
    let timeout = config.pending_timeout().as_secs_f64();
    // A `CreatePayment` still waiting in the outbox (not parked) will go out:
    // sending another would only queue a duplicate behind it.
    let due = sqlx::query!(
        r#"SELECT o.id, o.user_id, o.price AS "price: Money", o.created_at,
                  o.created_at < now() - make_interval(secs => $2) AS "give_up!"
           FROM orders o LEFT JOIN order_sweeps s ON s.order_id = o.id
           WHERE o.status = 'pending' AND o.created_at < now() - make_interval(secs => $1)
             AND (s.last_sent_at IS NULL OR s.last_sent_at < now() - make_interval(secs => $1))
             AND (o.created_at < now() - make_interval(secs => $2) OR NOT EXISTS (
                 SELECT 1 FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL
                   AND correlation_id = o.id::text AND message_type = 'CreatePayment'))
           ORDER BY o.created_at LIMIT $3"#,
        redrive,
        timeout,
        i64::from(config.sweep_batch),
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut swept = Swept::default();
    for order in due {
        let (id, user_id, amount) = (order.id, order.user_id, order.price);
        let waited = waited(order.created_at);
        if order.give_up {
            OUTBOX.enqueue(&mut tx, &VoidPayment { id, user_id, amount }).await?;
            tracing::warn!(order_id = %id, user_id = %user_id, waited_secs = waited, "order pending too long: voiding its payment");
            swept.voided += 1;
        } else {
            OUTBOX.enqueue(&mut tx, &CreatePayment { id, user_id, amount }).await?;
            tracing::warn!(order_id = %id, user_id = %user_id, waited_secs = waited, "order still pending: payment re-driven");
            swept.redriven += 1;
        }
        sqlx::query!(
            "INSERT INTO order_sweeps (order_id, redrives, voids, last_sent_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (order_id) DO UPDATE SET redrives = order_sweeps.redrives + EXCLUDED.redrives,
                 voids = order_sweeps.voids + EXCLUDED.voids, last_sent_at = now()",
            id,
            i32::from(!order.give_up),
            i32::from(order.give_up),
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    metrics::counter!("orders_redriven_total").increment(u64::from(swept.redriven));
    metrics::counter!("orders_voided_total").increment(u64::from(swept.voided));
    Ok(swept)
}

fn waited(created_at: DateTime<Utc>) -> i64 {
    (Utc::now() - created_at).num_seconds()
}
