//! Sends the queued e-mails: over SMTP when a server is configured, else as
//! `.eml` files in a directory. Woken by NOTIFY when an e-mail or a profile
//! is written, with a poll as safety net; a failed send is retried with
//! growing delays, and every delivery is recorded with its address and time.

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

    /// Sends every due e-mail whose recipient is known, a batch at a time.
    async fn send_due(&self) -> anyhow::Result<()> {
        loop {
            let mut tx = self.db.begin().await?;
            let due = sqlx::query_as!(
                Due,
                "SELECT d.id, d.subject, d.body, p.email, p.first_name, p.last_name
                 FROM email_deliveries d JOIN profiles p ON p.user_id = d.user_id
                 WHERE d.sent_at IS NULL AND d.next_attempt_at <= now()
                 ORDER BY d.id LIMIT 20 FOR UPDATE OF d SKIP LOCKED",
            )
            .fetch_all(&mut *tx)
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
                        .execute(&mut *tx)
                            .await?;
                    }
                    Err(e) => {
                        metrics::counter!("emails_failed_total").increment(1);
                        tracing::warn!(delivery_id = mail.id, error = %e, "e-mail not sent; will retry");
                        sqlx::query!(
                            "UPDATE email_deliveries SET attempts = attempts + 1, last_error = $2,
                                next_attempt_at = now() + least(interval '2 seconds' * power(2, attempts), interval '1 hour')
                             WHERE id = $1",
                            mail.id,
                            format!("{e:#}"),
                        )
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            tx.commit().await?;
        }
    }

    async fn send(&self, mail: &Due) -> anyhow::Result<()> {
        let name =
            [mail.first_name.as_deref(), mail.last_name.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(" ");
        let to = Mailbox::new(
            (!name.is_empty()).then_some(name),
            Email::parse(&mail.email).context("recipient address")?.address().clone(),
        );
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&mail.subject)
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())?;
        match &self.transport {
            Transport::Smtp(t) => {
                t.send(message).await?;
            }
            Transport::Files(t) => {
                t.send(message).await?;
            }
        }
        Ok(())
    }
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
