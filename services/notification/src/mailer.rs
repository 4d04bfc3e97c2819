//! Sends the queued e-mails: over SMTP when a server is configured (plain,
//! STARTTLS or implicit TLS as its URL says), else as `.eml` files in a
//! directory. Woken by NOTIFY when an e-mail or a profile
//! is written, with a poll as safety net; a temporary failure (4xx, server
//! unreachable) is retried with growing delays, a permanent one (an address
//! the library refuses, a 5xx answer) ends the delivery as failed with its
//! reason, and every delivery is recorded with its address and time.
//!
//! Each address has an e-mail budget (`EMAILS_PER_RECIPIENT_PER_HOUR`), kept
//! in the database so that every replica spends the same one: an e-mail
//! beyond it is dropped (`suppressed_at`, `emails_suppressed_total`), and the
//! notification it was for stays stored and listed. So nobody can make the
//! system mail-bomb an address, whatever they make it notify.
//!
//! An e-mail is `multipart/alternative` (text, and HTML with the text
//! escaped), its `Message-ID` derived from the notification's id (a resend is
//! recognisably the same message), with `List-Unsubscribe` and
//! `List-Unsubscribe-Post` (RFC 8058) when unsubscribe links are configured,
//! and DKIM-signed (RFC 6376) when a key is. A user who unsubscribed gets no
//! e-mail: theirs are dropped (`suppressed_at`) like those beyond a budget.

use anyhow::Context;
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm, DkimSigningKey,
};
use lettre::message::header::{Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use runtime::contact::Email;
use sqlx::PgPool;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::MailConfig;
use crate::delivery::{self, BUDGET_WINDOW, Budget};
use crate::unsubscribe::{Links, escape_html};

pub const EMAIL_CHANNEL: &str = "email";

/// E-mails claimed at a time.
const BATCH: i64 = 20;

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(AsyncFileTransport<Tokio1Executor>),
}

pub struct Mailer {
    db: PgPool,
    from: Mailbox,
    transport: Transport,
    /// E-mails per address an hour.
    budget: Budget,
    /// The domain of the `Message-ID`s: the DKIM domain, else the sender's.
    id_domain: String,
    dkim: Option<DkimConfig>,
    unsubscribe: Option<Arc<Links>>,
    /// How long one SMTP exchange may take.
    smtp_timeout: Duration,
}

/// How the e-mails are DKIM-signed (RFC 6376): all three, or none.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DkimSettings {
    /// The DKIM selector: the key's public half is published as a TXT record
    /// at `SELECTOR._domainkey.DOMAIN`.
    #[arg(long, env = "DKIM_SELECTOR")]
    pub dkim_selector: Option<String>,

    /// The signing domain (`d=`): the sender's domain or a parent of it.
    #[arg(long, env = "DKIM_DOMAIN")]
    pub dkim_domain: Option<String>,

    /// PEM file of the RSA private key (PKCS#1, `BEGIN RSA PRIVATE KEY`;
    /// `openssl genrsa -traditional 2048`). Read at start: a file that cannot
    /// be read or is not such a key stops the service.
    #[arg(long, env = "DKIM_PRIVATE_KEY_FILE")]
    pub dkim_private_key_file: Option<PathBuf>,
}

/// The headers the DKIM signature covers: those a recipient trusts, and the
/// unsubscribe pair, which RFC 8058 requires to be signed. Not
/// `Content-Type`: lettre writes a multipart's with the body, so its signer
/// would list it in `h=` without hashing it, and no verifier would agree.
const DKIM_SIGNED: &[&str] =
    &["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "List-Unsubscribe", "List-Unsubscribe-Post"];

impl DkimSettings {
    /// The signing configuration, or `None` when DKIM is not configured.
    fn load(&self) -> anyhow::Result<Option<DkimConfig>> {
        let (selector, domain, file) = match (&self.dkim_selector, &self.dkim_domain, &self.dkim_private_key_file) {
            (None, None, None) => return Ok(None),
            (Some(s), Some(d), Some(f)) => (s, d, f),
            _ => anyhow::bail!("DKIM: set DKIM_SELECTOR, DKIM_DOMAIN and DKIM_PRIVATE_KEY_FILE together, or none"),
        };
        let pem = std::fs::read_to_string(file)
            .with_context(|| format!("DKIM_PRIVATE_KEY_FILE {}: cannot read the DKIM key", file.display()))?;
        if pem.contains("BEGIN PRIVATE KEY") {
            anyhow::bail!(
                "DKIM_PRIVATE_KEY_FILE {}: a PKCS#8 key; the signer takes PKCS#1                  (`openssl rsa -in KEY -traditional -out KEY.pkcs1`)",
                file.display()
            );
        }
        let key = DkimSigningKey::new(&pem, DkimSigningAlgorithm::Rsa).map_err(|e| {
            anyhow::anyhow!("DKIM_PRIVATE_KEY_FILE {}: not an RSA private key in PKCS#1 PEM: {e}", file.display())
        })?;
        tracing::info!(selector = %selector, domain = %domain, "e-mails are DKIM-signed");
        Ok(Some(DkimConfig::new(
            selector.clone(),
            domain.clone(),
            key,
            DKIM_SIGNED.iter().map(|h| HeaderName::new_from_ascii_str(h)).collect(),
            DkimCanonicalization { header: DkimCanonicalizationType::Relaxed, body: DkimCanonicalizationType::Relaxed },
        )))
    }
}

/// `List-Unsubscribe` (RFC 2369): where the recipient unsubscribes.
#[derive(Clone, Debug)]
struct ListUnsubscribe(String);

impl Header for ListUnsubscribe {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("List-Unsubscribe")
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribe(s.to_string()))
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058): a POST
/// to the `List-Unsubscribe` link unsubscribes, with no page in between.
#[derive(Clone, Debug)]
struct ListUnsubscribePost;

impl Header for ListUnsubscribePost {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("List-Unsubscribe-Post")
    }
    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribePost)
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "List-Unsubscribe=One-Click".into())
    }
}

struct Due {
    id: i64,
    notification_id: Uuid,
    user_id: Uuid,
    unsubscribed: bool,
    subject: String,
    body: String,
    attempts: i32,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
}

impl Mailer {
    pub fn new(config: &MailConfig, db: PgPool, unsubscribe: Option<Arc<Links>>) -> anyhow::Result<Self> {
        let from: Mailbox = config.mail_from.parse().context("MAIL_FROM")?;
        let dkim = config.dkim.load()?;
        let id_domain = config
            .dkim
            .dkim_domain
            .clone()
            .filter(|_| dkim.is_some())
            .unwrap_or_else(|| from.email.domain().to_string());
        if unsubscribe.is_none() {
            tracing::warn!(
                "unsubscribe links are not configured (UNSUBSCRIBE_SECRET, PUBLIC_URL): e-mails carry no List-Unsubscribe"
            );
        }
        let transport = match &config.smtp_url {
            Some(url) => Transport::Smtp(smtp_transport(config, url)?),
            None => {
                std::fs::create_dir_all(&config.mail_dir)
                    .with_context(|| format!("creating {}", config.mail_dir.display()))?;
                let dir = std::fs::canonicalize(&config.mail_dir)?;
                tracing::warn!(dir = %dir.display(), "no SMTP server configured (SMTP_URL); e-mails are written as files");
                Transport::Files(AsyncFileTransport::new(dir))
            }
        };
        let budget = Budget::per_hour(config.emails_per_recipient_per_hour);
        let smtp_timeout = Duration::from_secs(config.smtp_timeout_secs.max(1));
        Ok(Mailer { db, from, transport, budget, id_domain, dkim, unsubscribe, smtp_timeout })
    }

    pub async fn run(self, poll: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
        delivery::run(&self.db, EMAIL_CHANNEL, poll, &shutdown, "mailer", || self.send_due(&shutdown)).await
    }

    /// Sends every due e-mail whose recipient is known, a batch at a time,
    /// holding no transaction across the SMTP exchanges: the batch is claimed
    /// first (its `next_attempt_at` moved past the time a batch may take, in
    /// one short statement with `SKIP LOCKED`, so replicas take different
    /// e-mails and a mailer that dies leaves them to the others), then each
    /// e-mail is sent and its outcome recorded on its own. Asked to stop, it
    /// hands the batch's unsent e-mails back (due at once, for another
    /// replica) after the one in flight, instead of keeping them claimed.
    async fn send_due(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        loop {
            let due = sqlx::query_as!(
                Due,
                "UPDATE email_deliveries d SET next_attempt_at = now() + interval '10 minutes'
                 FROM profiles p
                 WHERE p.user_id = d.user_id AND d.id IN (
                     SELECT d.id FROM email_deliveries d JOIN profiles p ON p.user_id = d.user_id
                     WHERE d.sent_at IS NULL AND d.failed_at IS NULL AND d.suppressed_at IS NULL
                       AND d.next_attempt_at <= now()
                     ORDER BY d.id LIMIT $1 FOR UPDATE OF d SKIP LOCKED)
                 RETURNING d.id, d.notification_id, d.user_id, d.subject, d.body, d.attempts, p.email, p.first_name, p.last_name,
                     EXISTS (SELECT 1 FROM email_unsubscribes u WHERE u.user_id = d.user_id) AS \"unsubscribed!\"",
                BATCH,
            )
            .fetch_all(&self.db)
            .await?;
            if due.is_empty() {
                return Ok(());
            }
            for (i, mail) in due.iter().enumerate() {
                if shutdown.is_cancelled() {
                    let rest: Vec<i64> = due[i..].iter().map(|m| m.id).collect();
                    sqlx::query!("UPDATE email_deliveries SET next_attempt_at = now() WHERE id = ANY($1)", &rest)
                        .execute(&self.db)
                        .await?;
                    return Ok(());
                }
                if mail.unsubscribed {
                    metrics::counter!("emails_unsubscribed_total").increment(1);
                    tracing::info!(delivery_id = mail.id, user_id = %mail.user_id, "recipient unsubscribed; not sent");
                    sqlx::query!("UPDATE email_deliveries SET suppressed_at = now() WHERE id = $1", mail.id)
                        .execute(&self.db)
                        .await?;
                    continue;
                }
                if !self.within_budget(mail).await? {
                    metrics::counter!("emails_suppressed_total").increment(1);
                    tracing::info!(delivery_id = mail.id, to = %mail.email, "recipient's e-mail budget spent; not sent");
                    sqlx::query!("UPDATE email_deliveries SET suppressed_at = now() WHERE id = $1", mail.id)
                        .execute(&self.db)
                        .await?;
                    continue;
                }
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
                        let delay = delivery::retry_delay(mail.attempts, RETRY_BASE, None);
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
            // A short batch took every due e-mail there was when it was
            // claimed; one written since has its own NOTIFY, which wakes the
            // next pass (no empty claim to find that out).
            if due.len() < BATCH as usize {
                return Ok(());
            }
        }
    }

    /// Takes one e-mail from the recipient's budget (see [`Budget::allows`]):
    /// whether it may be sent.
    async fn within_budget(&self, mail: &Due) -> sqlx::Result<bool> {
        let take = |window: f64| {
            sqlx::query_scalar!(
                "INSERT INTO email_budgets AS b (recipient, window_start, used) VALUES (lower($1), now(), 1)
             ON CONFLICT (recipient) DO UPDATE SET
                 used = CASE WHEN b.window_start <= now() - make_interval(secs => $2) THEN 1 ELSE b.used + 1 END,
                 window_start = CASE WHEN b.window_start <= now() - make_interval(secs => $2)
                                     THEN now() ELSE b.window_start END
             RETURNING used",
                mail.email,
                window,
            )
            .fetch_one(&self.db)
        };
        self.budget.allows(mail.attempts, take).await
    }

    /// The e-mail of a delivery, as it goes out (signed when DKIM is configured).
    fn message(&self, mail: &Due) -> Result<Message, SendError> {
        let name =
            [mail.first_name.as_deref(), mail.last_name.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(" ");
        // The parser registration uses too: what it accepted can be sent to.
        let address = Email::parse(&mail.email)
            .map_err(|e| SendError::Permanent(format!("recipient address {:?} refused: {e}", mail.email)))?
            .address()
            .clone();
        let to = Mailbox::new((!name.is_empty()).then_some(name), address);
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&mail.subject)
            .message_id(Some(message_id(mail.notification_id, &self.id_domain)));
        let mut link = None;
        if let Some(links) = &self.unsubscribe {
            builder = builder.header(ListUnsubscribe(links.list_unsubscribe(mail.user_id))).header(ListUnsubscribePost);
            link = Some(links.url(mail.user_id));
        }
        let (text, html) = bodies(&mail.body, link.as_ref().map(|u| u.as_str()));
        let mut message = builder
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|e| SendError::Permanent(format!("the message cannot be built: {e}")))?;
        if let Some(dkim) = &self.dkim {
            message.sign(dkim);
        }
        Ok(message)
    }

    async fn send(&self, mail: &Due) -> Result<(), SendError> {
        let message = self.message(mail)?;
        match &self.transport {
            // lettre's own timeout bounds the connection only: the whole
            // exchange is bounded here (no connection is pooled, so the one
            // given up is closed).
            Transport::Smtp(t) => match tokio::time::timeout(self.smtp_timeout, t.send(message)).await {
                Err(_) => Err(SendError::Temporary(format!(
                    "the SMTP server did not answer within {} s",
                    self.smtp_timeout.as_secs_f64()
                ))),
                Ok(sent) => sent.map(|_| ()).map_err(|e| {
                    // A 5xx answer will not change; anything else (4xx, no
                    // connection, a timeout) may.
                    if e.is_permanent() {
                        SendError::Permanent(format!("refused by the SMTP server: {e}"))
                    } else {
                        SendError::Temporary(format!("{e}"))
                    }
                }),
            },
            Transport::Files(t) => t.send(message).await.map(|_| ()).map_err(|e| SendError::Temporary(format!("{e}"))),
        }
    }
}

/// The `Message-ID` of a notification's e-mail: the same on every attempt
/// and every replica, so a resend is recognisably the same message.
fn message_id(notification_id: Uuid, domain: &str) -> String {
    format!("<notification-{notification_id}@{domain}>")
}

/// The text and HTML bodies of an e-mail: the notification's text (escaped
/// in the HTML), and the unsubscribe link when there is one.
fn bodies(message: &str, unsubscribe: Option<&str>) -> (String, String) {
    let mut text = format!("{message}\n");
    let mut html = format!("<!doctype html><html><body>\n<p>{}</p>\n", escape_html(message));
    if let Some(link) = unsubscribe {
        text.push_str(&format!("\n--\nNo more e-mails about your orders: {link}\n"));
        html.push_str(&format!(
            "<p style=\"font-size:small;color:#666\"><a href=\"{}\">Unsubscribe</a> from e-mails about your orders.</p>\n",
            escape_html(link)
        ));
    }
    html.push_str("</body></html>\n");
    (text, html)
}

/// Budgets whose window is over (they count as absent), for `runtime::data::prune`.
pub fn spent_budgets() -> runtime::data::prune::Prune {
    runtime::prune!(
        "email_budgets",
        BUDGET_WINDOW,
        "DELETE FROM email_budgets WHERE recipient IN (
             SELECT recipient FROM email_budgets WHERE window_start < now() - make_interval(secs => $1) LIMIT $2)"
    )
}

/// First retry of a temporary failure after this, doubling up to
/// [`delivery::RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_secs(2);

/// Why an e-mail was not sent.
enum SendError {
    /// It never will be (an address the library refuses, a 5xx answer).
    Permanent(String),
    /// It may be later (a 4xx answer, the server unreachable).
    Temporary(String),
}

/// How the connection to the SMTP server is secured, from `SMTP_URL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Security {
    /// `smtp://`: plain SMTP (a relay on the same host or network).
    Plain,
    /// `smtp://…?tls=opportunistic`: STARTTLS when the server offers it.
    Opportunistic,
    /// `smtp://…?tls=required`: STARTTLS, and no mail when the server does not offer it.
    StartTls,
    /// `smtps://`: TLS from the first byte (implicit TLS, port 465).
    Implicit,
}

/// The SMTP transport for `url` (see [`MailConfig::smtp_url`]): TLS (rustls,
/// the public web roots plus `SMTP_CA_FILE`) as the URL says, credentials
/// from the URL's userinfo or `SMTP_USERNAME`/`SMTP_PASSWORD`.
fn smtp_transport(config: &MailConfig, url: &str) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let shown = runtime::data::db::redact(url);
    let parsed = url::Url::parse(url).with_context(|| format!("SMTP_URL {shown}"))?;
    let host = parsed.host_str().filter(|h| !h.is_empty()).with_context(|| format!("SMTP_URL {shown} has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let tls = parsed.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
    let security = match (parsed.scheme(), tls.as_deref()) {
        ("smtp", None) => Security::Plain,
        ("smtp", Some("required")) => Security::StartTls,
        ("smtp", Some("opportunistic")) => Security::Opportunistic,
        ("smtps", None) => Security::Implicit,
        _ => anyhow::bail!(
            "SMTP_URL {shown}: use smtp://host[:port] (plain), smtp://host[:port]?tls=required (STARTTLS), \
             smtp://host[:port]?tls=opportunistic or smtps://host[:port] (implicit TLS)"
        ),
    };
    // Scheme, port (25, 587 or 465 by default), userinfo and HELO name as lettre reads them.
    let mut builder =
        AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map_err(|e| anyhow::anyhow!("SMTP_URL {shown}: {e}"))?;
    if security != Security::Plain {
        let mut params = TlsParameters::builder(host);
        if let Some(file) = &config.smtp_ca_file {
            let pem = std::fs::read(file).with_context(|| format!("SMTP_CA_FILE {}", file.display()))?;
            let ca = Certificate::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("SMTP_CA_FILE {}: not PEM certificates: {e}", file.display()))?;
            params = params.add_root_certificate(ca);
        }
        let params = params.build().map_err(|e| anyhow::anyhow!("SMTP TLS: {e}"))?;
        builder = builder.tls(match security {
            Security::Opportunistic => Tls::Opportunistic(params),
            Security::StartTls => Tls::Required(params),
            _ => Tls::Wrapper(params),
        });
    }
    match (&config.smtp_username, &config.smtp_password) {
        (Some(user), Some(password)) => builder = builder.credentials(Credentials::new(user.clone(), password.clone())),
        (None, None) => {}
        _ => anyhow::bail!("set both SMTP_USERNAME and SMTP_PASSWORD, or neither"),
    }
    let logs_in = parsed.password().is_some() || config.smtp_username.is_some();
    if logs_in && matches!(security, Security::Plain | Security::Opportunistic) {
        tracing::warn!(smtp = %shown, "SMTP credentials may travel unencrypted: use smtps:// or ?tls=required");
    }
    tracing::info!(smtp = %shown, ?security, "e-mails go to the SMTP server");
    Ok(builder.timeout(Some(Duration::from_secs(config.smtp_timeout_secs.max(1)))).build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::message::header::ContentType;
    use runtime::auth::tls::TestAuthority;
    use std::path::PathBuf;

    /// `tools/smtp-sink.py` (aiosmtpd) on a free loopback port, writing a
    /// Maildir in its own directory, removed with it.
    struct Sink {
        port: u16,
        dir: PathBuf,
        _process: tokio::process::Child,
    }

    impl Drop for Sink {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Sink {
        /// `mode`: `[]` plain, `["--starttls"]` or `["--smtps"]` (with the
        /// authority's server certificate); `login`: `USER:PASSWORD` it demands.
        async fn start(mode: Option<&str>, login: Option<&str>, authority: &TestAuthority) -> Sink {
            let dir = std::env::temp_dir().join(format!("smtp-sink-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert, &authority.cert_pem).unwrap();
            std::fs::write(&key, &authority.key_pem).unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/smtp-sink.py");
            let mut command = tokio::process::Command::new("python3");
            command
                .arg(script)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--maildir")
                .arg(dir.join("maildir"));
            if let Some(mode) = mode {
                command.arg(mode).arg(&cert).arg(&key);
            }
            if let Some(login) = login {
                command.arg("--login").arg(login);
            }
            let process = command.kill_on_drop(true).spawn().expect("python3 with aiosmtpd (pip install aiosmtpd)");
            let sink = Sink { port, dir, _process: process };
            for _ in 0..200 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return sink;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the SMTP sink did not start on port {port}");
        }

        fn messages(&self) -> Vec<String> {
            let Ok(entries) = std::fs::read_dir(self.dir.join("maildir").join("new")) else { return vec![] };
            entries.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()).collect()
        }

        /// The authority's CA certificate as a file, for `SMTP_CA_FILE`.
        fn ca_file(&self, authority: &TestAuthority) -> PathBuf {
            let path = self.dir.join("ca.pem");
            std::fs::write(&path, &authority.ca_pem).unwrap();
            path
        }
    }

    fn config(ca_file: Option<PathBuf>, login: Option<(&str, &str)>) -> MailConfig {
        MailConfig {
            smtp_url: None,
            mail_dir: PathBuf::from("unused"),
            mail_from: "Order System <orders@localhost>".into(),
            emails_per_recipient_per_hour: 0,
            smtp_username: login.map(|l| l.0.to_string()),
            smtp_password: login.map(|l| l.1.to_string()),
            smtp_ca_file: ca_file,
            smtp_timeout_secs: 30,
            dkim: Default::default(),
            unsubscribe: Default::default(),
        }
    }

    /// E-mails due for `user` (their profile known), `n` of them.
    async fn due_emails(db: &PgPool, user: uuid::Uuid, n: usize) {
        sqlx::query("INSERT INTO profiles (user_id, email) VALUES ($1, 'someone@example.com')")
            .bind(user)
            .execute(db)
            .await
            .unwrap();
        for i in 0..n {
            let notification = uuid::Uuid::new_v4();
            sqlx::query("INSERT INTO notifications (id, user_id, message) VALUES ($1, $2, 'm')")
                .bind(notification)
                .bind(user)
                .execute(db)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO email_deliveries (notification_id, user_id, subject, body) VALUES ($1, $2, $3, 'b')",
            )
            .bind(notification)
            .bind(user)
            .bind(format!("e-mail {i}"))
            .execute(db)
            .await
            .unwrap();
        }
    }

    #[tokio::test]
    async fn a_mailer_asked_to_stop_mid_batch_hands_the_unsent_emails_back() {
        let db = test_support::ServiceDb::new("notification", sqlx::migrate!("../../migrations/notification")).await;
        due_emails(&db.pool, uuid::Uuid::new_v4(), 3).await;
        // A server that accepts and never answers: the first e-mail waits
        // there (until the exchange's timeout) with the batch claimed.
        let hung = test_support::SilentListener::start().await;
        let mail = MailConfig {
            smtp_url: Some(format!("smtp://127.0.0.1:{}", hung.port)),
            smtp_timeout_secs: 2,
            ..config(None, None)
        };
        let mailer = Mailer::new(&mail, db.pool.clone(), None).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mailer.run(Duration::from_secs(60), shutdown.clone()));
        test_support::eventually(Duration::from_secs(10), || async { (hung.accepted() > 0).then_some(()) }).await;
        let claimed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM email_deliveries WHERE next_attempt_at > now() + interval '5 minutes'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(claimed, 3, "the whole batch is claimed while the first e-mail is in flight");
        shutdown.cancel();
        task.await.unwrap().unwrap();
        // The one in flight timed out and is retried later; the two never
        // tried are due again at once.
        let rows: Vec<(String, i32, bool, Option<String>)> = sqlx::query_as(
            "SELECT subject, attempts, next_attempt_at <= now(), last_error FROM email_deliveries WHERE sent_at IS NULL ORDER BY id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 3, "nothing was sent: {rows:?}");
        assert_eq!(rows[0].1, 1, "the first e-mail was tried once, to be retried: {rows:?}");
        assert!(rows[0].3.as_deref().unwrap_or_default().contains("did not answer within 2 s"), "{rows:?}");
        assert_eq!(
            rows[1..].iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(),
            vec![(0, true), (0, true)],
            "the rest are handed back untried and due now"
        );
    }

    fn message(subject: &str) -> Message {
        Message::builder()
            .from("Order System <orders@localhost>".parse().unwrap())
            .to("someone@example.com".parse().unwrap())
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body("hello".to_string())
            .unwrap()
    }

    #[tokio::test]
    async fn mail_arrives_over_implicit_tls_with_the_credentials_of_the_url() {
        let authority = runtime::auth::tls::test_authority().unwrap();
        let sink = Sink::start(Some("--smtps"), Some("mailer:s3cret/pw"), &authority).await;
        let config = config(Some(sink.ca_file(&authority)), None);
        // `/` in the password is percent-encoded in the URL.
        let url = format!("smtps://mailer:s3cret%2Fpw@localhost:{}", sink.port);
        let transport = smtp_transport(&config, &url).unwrap();
        transport.send(message("over smtps")).await.expect("sent over implicit TLS");
        let messages = sink.messages();
        assert_eq!(messages.len(), 1);
        assert!(messages[0].contains("Subject: over smtps"), "{}", messages[0]);
    }

    #[tokio::test]
    async fn mail_arrives_over_starttls_with_the_configured_credentials() {
        let authority = runtime::auth::tls::test_authority().unwrap();
        // The sink refuses MAIL before STARTTLS and AUTH without TLS.
        let sink = Sink::start(Some("--starttls"), Some("mailer:pw"), &authority).await;
        let config = config(Some(sink.ca_file(&authority)), Some(("mailer", "pw")));
        let url = format!("smtp://127.0.0.1:{}?tls=required", sink.port);
        let transport = smtp_transport(&config, &url).unwrap();
        transport.send(message("over starttls")).await.expect("sent after STARTTLS");
        assert_eq!(sink.messages().len(), 1);
    }

    #[tokio::test]
    async fn a_server_without_starttls_gets_no_mail_when_tls_is_required() {
        let authority = runtime::auth::tls::test_authority().unwrap();
        let sink = Sink::start(None, None, &authority).await;
        let config = config(Some(sink.ca_file(&authority)), None);
        let plain = smtp_transport(&config, &format!("smtp://127.0.0.1:{}", sink.port)).unwrap();
        plain.send(message("plain")).await.expect("plain SMTP where the URL asks for nothing more");
        assert_eq!(sink.messages().len(), 1);

        let required = smtp_transport(&config, &format!("smtp://127.0.0.1:{}?tls=required", sink.port)).unwrap();
        let err = required.send(message("must not arrive in clear")).await.expect_err("refused");
        assert!(!err.is_permanent(), "a temporary failure, retried later: {err}");
        assert!(err.to_string().to_lowercase().contains("starttls"), "{err}");
        assert_eq!(sink.messages().len(), 1, "nothing more was sent in clear");
    }

    #[tokio::test]
    async fn a_server_whose_certificate_is_not_trusted_gets_no_mail() {
        let authority = runtime::auth::tls::test_authority().unwrap();
        let sink = Sink::start(Some("--smtps"), None, &authority).await;
        // Another authority's CA: the server's certificate does not chain to it.
        let other = runtime::auth::tls::test_authority().unwrap();
        let config = config(Some(sink.ca_file(&other)), None);
        let transport = smtp_transport(&config, &format!("smtps://localhost:{}", sink.port)).unwrap();
        let err = transport.send(message("untrusted")).await.expect_err("refused");
        assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
        assert!(sink.messages().is_empty());
    }

    #[test]
    fn the_url_chooses_the_security_and_a_bad_one_is_a_configuration_error() {
        let config = config(None, None);
        for good in
            ["smtp://relay", "smtp://relay:2525?tls=required", "smtp://relay?tls=opportunistic", "smtps://u:p@relay"]
        {
            assert!(smtp_transport(&config, good).is_ok(), "{good}");
        }
        for bad in ["http://relay", "smtps://relay?tls=required", "smtp://relay?tls=always", "smtp://", "relay:25"] {
            let err = smtp_transport(&config, bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(err.to_string().contains("SMTP_URL"), "{bad}: {err}");
        }
        let half = MailConfig { smtp_password: None, ..super::tests::config(None, Some(("user", "pw"))) };
        assert!(smtp_transport(&half, "smtps://relay").is_err(), "a user without a password");
        let missing = super::tests::config(Some(PathBuf::from("/nonexistent/ca.pem")), None);
        let err = smtp_transport(&missing, "smtps://relay").err().unwrap();
        assert!(err.to_string().contains("SMTP_CA_FILE"), "{err}");
    }

    fn dkim(dir: &std::path::Path, key: Option<&str>) -> DkimSettings {
        let file = dir.join("dkim.pem");
        if let Some(key) = key {
            std::fs::write(&file, key).unwrap();
        }
        DkimSettings {
            dkim_selector: Some("s1".into()),
            dkim_domain: Some("example.com".into()),
            dkim_private_key_file: Some(file),
        }
    }

    #[tokio::test]
    async fn a_dkim_key_that_cannot_be_used_stops_the_start_with_its_reason() {
        let dir = std::env::temp_dir().join(format!("dkim-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = |settings: DkimSettings| format!("{:#}", settings.load().expect_err("refused"));

        let missing = err(dkim(&dir, None));
        assert!(missing.contains("DKIM_PRIVATE_KEY_FILE") && missing.contains("cannot read"), "{missing}");
        let garbage =
            err(dkim(&dir, Some("-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n")));
        assert!(garbage.contains("DKIM_PRIVATE_KEY_FILE") && garbage.contains("not an RSA private key"), "{garbage}");
        let pkcs8 =
            err(dkim(&dir, Some("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n")));
        assert!(pkcs8.contains("PKCS#8") && pkcs8.contains("-traditional"), "{pkcs8}");
        let partial = err(DkimSettings { dkim_domain: None, ..dkim(&dir, None) });
        assert!(partial.contains("DKIM_SELECTOR, DKIM_DOMAIN and DKIM_PRIVATE_KEY_FILE"), "{partial}");
        assert!(DkimSettings::default().load().unwrap().is_none(), "no DKIM is a choice, not an error");

        // Mailer::new, the service's start, fails the same way.
        let unreadable = DkimSettings { dkim_private_key_file: Some(dir.join("absent.pem")), ..dkim(&dir, None) };
        let config = MailConfig { dkim: unreadable, ..config(None, None) };
        let db = sqlx::PgPool::connect_lazy("postgres://unused@127.0.0.1:1/none").unwrap();
        let Err(start) = Mailer::new(&config, db, None) else { panic!("started with an unreadable DKIM key") };
        let start = format!("{start:#}");
        assert!(start.contains("DKIM_PRIVATE_KEY_FILE") && start.contains("absent.pem"), "{start}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_html_part_escapes_the_text_and_the_link() {
        let (text, html) = bodies("Tom & <Jerry> \"quoted\"", Some("https://x.example/u?token=a&b"));
        assert!(text.starts_with("Tom & <Jerry> \"quoted\"\n"), "{text}");
        assert!(text.contains("https://x.example/u?token=a&b"), "{text}");
        assert!(html.contains("<p>Tom &amp; &lt;Jerry&gt; &quot;quoted&quot;</p>"), "{html}");
        assert!(html.contains("<a href=\"https://x.example/u?token=a&amp;b\">"), "{html}");
        assert!(!html.contains("<Jerry>"), "{html}");
        let (text, html) = bodies("no link", None);
        assert!(!text.contains("http") && !html.contains("href"), "{text} {html}");
    }

    #[test]
    fn the_message_id_is_the_notifications() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(message_id(id, "example.com"), format!("<notification-{id}@example.com>"));
        assert_eq!(message_id(id, "example.com"), message_id(id, "example.com"));
    }
}
