//! Sends the queued e-mails: over SMTP when a server is configured, else as
//! `.eml` files in a directory. Woken by NOTIFY when an e-mail or a profile
//! is written, with a poll as safety net; a temporary failure (4xx, server
//! unreachable) is retried with growing delays, a permanent one (an address
//! the library refuses, a 5xx answer) ends the delivery as failed with its
//! reason, and every delivery is recorded with its address and time.

use anyhow::Context;
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use runtime::contact::Email;
use runtime::db::Wakeup;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::MailConfig;

pub const EMAIL_CHANNEL: &str = "email";

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(AsyncFileTransport<Tokio1Executor>),
}

pub struct Mailer {
    db: PgPool,
    from: Mailbox,
    transport: Transport,
}

struct Due {
    id: i64,
    subject: String,
    body: String,
    attempts: i32,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
}

impl Mailer {
    pub fn new(config: &MailConfig, db: PgPool) -> anyhow::Result<Self> {
        let from: Mailbox = config.mail_from.parse().context("MAIL_FROM")?;
        let transport = match &config.smtp_url {
            Some(url) => {
                let (host, port) = parse_smtp_url(url)?;
                let t = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .timeout(Some(Duration::from_secs(10)))
                    .build();
                tracing::info!(smtp = %url, "e-mails go to the SMTP server");
                Transport::Smtp(t)
            }
            None => {
                std::fs::create_dir_all(&config.mail_dir)
                    .with_context(|| format!("creating {}", config.mail_dir.display()))?;
                let dir = std::fs::canonicalize(&config.mail_dir)?;
                tracing::warn!(dir = %dir.display(), "no SMTP server configured (SMTP_URL); e-mails are written as files");
                Transport::Files(AsyncFileTransport::new(dir))
            }
        };
        Ok(Mailer { db, from, transport })
    }

    pub async fn run(self, poll: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut wakeup = Wakeup::new(self.db.clone(), EMAIL_CHANNEL, poll);
        loop {
            wakeup.listen().await;
            if let Err(e) = self.send_due().await {
                tracing::warn!(error = %e, "mailer pass failed");
            }
            if !wakeup.wait(&shutdown).await {
                return Ok(());
            }
        }
    }

    /// Sends every due e-mail whose recipient is known, a batch at a time,
    /// holding no transaction across the SMTP exchanges: the batch is claimed
    /// first (its `next_attempt_at` moved past the time a batch may take, in
    /// one short statement with `SKIP LOCKED`, so replicas take different
    /// e-mails and a mailer that dies leaves them to the others), then each
    /// e-mail is sent and its outcome recorded on its own.
    async fn send_due(&self) -> anyhow::Result<()> {
        loop {
            let due = sqlx::query_as!(
                Due,
                "UPDATE email_deliveries d SET next_attempt_at = now() + interval '10 minutes'
                 FROM profiles p
                 WHERE p.user_id = d.user_id AND d.id IN (
                     SELECT d.id FROM email_deliveries d JOIN profiles p ON p.user_id = d.user_id
                     WHERE d.sent_at IS NULL AND d.failed_at IS NULL AND d.next_attempt_at <= now()
                     ORDER BY d.id LIMIT 20 FOR UPDATE OF d SKIP LOCKED)
                 RETURNING d.id, d.subject, d.body, d.attempts, p.email, p.first_name, p.last_name",
            )
            .fetch_all(&self.db)
            .await?;
            if due.is_empty() {
                return Ok(());
            }
            for mail in &due {
                match self.send(mail).await {
                    Ok(()) => {
                        metrics::counter!("emails_sent_total").increment(1);
                        tracing::info!(delivery_id = mail.id, to = %mail.email, "e-mail sent");
                        sqlx::query!(
                            "UPDATE email_deliveries SET sent_at = now(), sent_to = $2, attempts = attempts + 1 WHERE id = $1",
                            mail.id,
                            mail.email,
                        )
                        .execute(&self.db)
                        .await?;
                    }
                    Err(SendError::Permanent(reason)) => {
                        metrics::counter!("emails_failed_total", "kind" => "permanent").increment(1);
                        tracing::error!(delivery_id = mail.id, to = %mail.email, %reason, "e-mail can never be sent; failed");
                        sqlx::query!(
                            "UPDATE email_deliveries SET attempts = attempts + 1, last_error = $2,
                                failed_at = now(), failed_reason = $2
                             WHERE id = $1",
                            mail.id,
                            reason,
                        )
                        .execute(&self.db)
                        .await?;
                    }
                    Err(SendError::Temporary(reason)) => {
                        metrics::counter!("emails_failed_total", "kind" => "temporary").increment(1);
                        let attempts = u32::try_from(mail.attempts).unwrap_or(0);
                        let delay = runtime::backoff::delay(attempts, RETRY_BASE, RETRY_CAP);
                        tracing::warn!(delivery_id = mail.id, %reason, retry_in = ?delay, "e-mail not sent; will retry");
                        sqlx::query!(
                            "UPDATE email_deliveries SET attempts = attempts + 1, last_error = $2,
                                next_attempt_at = now() + make_interval(secs => $3)
                             WHERE id = $1",
                            mail.id,
                            reason,
                            delay.as_secs_f64(),
                        )
                        .execute(&self.db)
                        .await?;
                    }
                }
            }
        }
    }

    async fn send(&self, mail: &Due) -> Result<(), SendError> {
        let name =
            [mail.first_name.as_deref(), mail.last_name.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(" ");
        // The parser registration uses too: what it accepted can be sent to.
        let address = Email::parse(&mail.email)
            .map_err(|e| SendError::Permanent(format!("recipient address {:?} refused: {e}", mail.email)))?
            .address()
            .clone();
        let to = Mailbox::new((!name.is_empty()).then_some(name), address);
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&mail.subject)
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())
            .map_err(|e| SendError::Permanent(format!("the message cannot be built: {e}")))?;
        match &self.transport {
            Transport::Smtp(t) => t.send(message).await.map(|_| ()).map_err(|e| {
                // A 5xx answer will not change; anything else (4xx, no
                // connection, a timeout) may.
                if e.is_permanent() {
                    SendError::Permanent(format!("refused by the SMTP server: {e}"))
                } else {
                    SendError::Temporary(format!("{e}"))
                }
            }),
            Transport::Files(t) => t.send(message).await.map(|_| ()).map_err(|e| SendError::Temporary(format!("{e}"))),
        }
    }
}

/// First retry of a temporary failure after this, doubling up to [`RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_secs(2);
const RETRY_CAP: Duration = Duration::from_secs(3600);

/// Why an e-mail was not sent.
enum SendError {
    /// It never will be (an address the library refuses, a 5xx answer).
    Permanent(String),
    /// It may be later (a 4xx answer, the server unreachable).
    Temporary(String),
}

/// `smtp://host[:port]` (plain SMTP, port 25 by default). TLS relays are
/// reached through a local relay or a later transport option.
fn parse_smtp_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.strip_prefix("smtp://").context("SMTP_URL must look like smtp://host:port")?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_string(), port.parse().context("SMTP_URL port")?)),
        None => Ok((rest.to_string(), 25)),
    }
}
