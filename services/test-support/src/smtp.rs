//! An SMTP server on loopback that keeps what it is sent in memory: plain,
//! or with implicit TLS from a test authority, answering each recipient as
//! the test's rule says (accept, refuse with any reply, or hold the session
//! until the test releases it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How the sink answers a `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rcpt {
    /// `250 OK`.
    Accept,
    /// This reply line, e.g. `550 5.1.1 no such mailbox` or `451 4.3.0 try again later`.
    Reply(String),
    /// Accepted once the test calls [`SmtpSink::release`]: a slow server
    /// the test knows is being waited on ([`SmtpSink::holding`]).
    Hold,
}

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// The message as sent (headers and body), dot-stuffing undone.
    pub data: String,
}

/// Decides the answer to a recipient on its `attempt`-th `RCPT TO` (from 1).
type Rule = dyn Fn(&str, u32) -> Rcpt + Send + Sync;

struct Shared {
    rule: Box<Rule>,
    mail: Mutex<Vec<Mail>>,
    attempts: Mutex<HashMap<String, u32>>,
    /// Recipients held now.
    held: watch::Sender<usize>,
    released: watch::Sender<bool>,
}

pub struct SmtpSink {
    pub port: u16,
    /// With implicit TLS: the CA file its certificate chains to.
    pub ca_file: Option<PathBuf>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    /// Plain SMTP, every recipient accepted.
    pub async fn start() -> SmtpSink {
        SmtpSink::with_rule(|_, _| Rcpt::Accept).await
    }

    /// Plain SMTP, recipients answered by `rule` (recipient, attempt from 1).
    pub async fn with_rule(rule: impl Fn(&str, u32) -> Rcpt + Send + Sync + 'static) -> SmtpSink {
        SmtpSink::listen(Box::new(rule), None).await
    }

    /// Implicit TLS (`smtps://`) with a certificate for `localhost` from a
    /// fresh test authority, whose certificate is written to `dir/ca.pem`.
    pub async fn smtps(dir: &Path) -> SmtpSink {
        let authority = runtime::auth::tls::test_authority().unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &authority.ca_pem).unwrap();
        let acceptor = crate::tls::acceptor(&authority);
        let mut sink = SmtpSink::listen(Box::new(|_, _| Rcpt::Accept), Some(acceptor)).await;
        sink.ca_file = Some(ca_file);
        sink
    }

    async fn listen(rule: Box<Rule>, tls: Option<tokio_rustls::TlsAcceptor>) -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            rule,
            mail: Default::default(),
            attempts: Default::default(),
            held: watch::channel(0).0,
            released: watch::channel(false).0,
        });
        let serving = shared.clone();
        let task = crate::tls::serve_each(listener, tls, move |stream| {
            let shared = serving.clone();
            async move {
                let _ = session(stream, &shared).await;
            }
        });
        SmtpSink { port, ca_file: None, shared, task }
    }

    /// The `SMTP_URL` that reaches this sink.
    pub fn url(&self) -> String {
        match self.ca_file {
            Some(_) => format!("smtps://localhost:{}", self.port),
            None => format!("smtp://127.0.0.1:{}", self.port),
        }
    }

    /// Every message accepted so far, as sent.
    pub fn messages(&self) -> Vec<String> {
        self.mail().into_iter().map(|m| m.data).collect()
    }

    pub fn mail(&self) -> Vec<Mail> {
        self.shared.mail.lock().unwrap().clone()
    }

    /// Whether a message to `recipient` was accepted.
    pub fn delivered_to(&self, recipient: &str) -> bool {
        self.shared.mail.lock().unwrap().iter().any(|m| m.to.iter().any(|to| to == recipient))
    }

    /// How many times `recipient` was named in a `RCPT TO`.
    pub fn attempts(&self, recipient: &str) -> u32 {
        self.shared.attempts.lock().unwrap().get(recipient).copied().unwrap_or(0)
    }

    /// Waits until `n` recipients are held ([`Rcpt::Hold`]), or fails the test.
    pub async fn holding(&self, n: usize) {
        let mut held = self.shared.held.subscribe();
        tokio::time::timeout(Duration::from_secs(30), held.wait_for(|h| *h >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} recipients held within 30 s"))
            .unwrap();
    }

    /// Lets every held recipient (and any later one) through.
    pub fn release(&self) {
        self.shared.released.send_replace(true);
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.release();
        self.task.abort();
    }
}

/// The address in `MAIL FROM:<a>` / `RCPT TO:<a> PARAMS`.
fn address(command: &str) -> String {
    let after = command.split_once(':').map_or("", |(_, a)| a).trim_start();
    match after.strip_prefix('<').and_then(|a| a.split_once('>')) {
        Some((address, _)) => address.to_string(),
        None => after.split(' ').next().unwrap_or_default().to_string(),
    }
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(stream: S, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    write.write_all(b"220 localhost ESMTP test sink\r\n").await?;
    write.flush().await?;
    let (mut from, mut to) = (String::new(), Vec::<String>::new());
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end();
        let verb = command.split(' ').next().unwrap_or_default().to_ascii_uppercase();
        let answer = match verb.as_str() {
            "EHLO" => "250-localhost\r\n250 8BITMIME".to_string(),
            "HELO" => "250 localhost".to_string(),
            "MAIL" => {
                from = address(command);
                to.clear();
                "250 OK".to_string()
            }
            "RCPT" => {
                let recipient = address(command);
                let attempt = {
                    let mut attempts = shared.attempts.lock().unwrap();
                    let n = attempts.entry(recipient.clone()).or_default();
                    *n += 1;
                    *n
                };
                match (shared.rule)(&recipient, attempt) {
                    Rcpt::Accept => {
                        to.push(recipient);
                        "250 OK".to_string()
                    }
                    Rcpt::Reply(text) => text,
                    Rcpt::Hold => {
                        let mut released = shared.released.subscribe();
                        shared.held.send_modify(|h| *h += 1);
                        let _ = released.wait_for(|r| *r).await;
                        shared.held.send_modify(|h| *h -= 1);
                        to.push(recipient);
                        "250 OK".to_string()
                    }
                }
            }
            "DATA" if to.is_empty() => "554 no valid recipients".to_string(),
            "DATA" => {
                write.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n").await?;
                write.flush().await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if read.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" || line == ".\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                let mail = Mail { from: from.clone(), to: std::mem::take(&mut to), data };
                shared.mail.lock().unwrap().push(mail);
                "250 OK queued".to_string()
            }
            "RSET" => {
                to.clear();
                "250 OK".to_string()
            }
            "NOOP" => "250 OK".to_string(),
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                write.flush().await?;
                return Ok(());
            }
            _ => "502 5.5.2 command not implemented".to_string(),
        };
        write.write_all(format!("{answer}\r\n").as_bytes()).await?;
        write.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    fn message(to: &str, subject: &str) -> Message {
        Message::builder()
            .from("Orders <orders@localhost>".parse().unwrap())
            .to(to.parse().unwrap())
            .subject(subject)
            .body(String::from("line one\r\n.a line that starts with a dot\r\n"))
            .unwrap()
    }

    fn plain(sink: &SmtpSink) -> AsyncSmtpTransport<Tokio1Executor> {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1").port(sink.port).build()
    }

    #[tokio::test]
    async fn a_message_arrives_as_sent() {
        let sink = SmtpSink::start().await;
        plain(&sink).send(message("ann@example.com", "Hello")).await.expect("accepted");
        let mail = sink.mail();
        assert_eq!(mail.len(), 1);
        assert_eq!(mail[0].from, "orders@localhost");
        assert_eq!(mail[0].to, ["ann@example.com"]);
        assert!(mail[0].data.contains("Subject: Hello"), "{}", mail[0].data);
        assert!(mail[0].data.contains("\r\n.a line that starts with a dot"), "dot-stuffing undone: {}", mail[0].data);
        assert!(sink.delivered_to("ann@example.com"));
        assert_eq!(sink.attempts("ann@example.com"), 1);
    }

    #[tokio::test]
    async fn a_recipient_is_answered_by_the_rule_on_each_attempt() {
        let sink = SmtpSink::with_rule(|to, attempt| match to {
            t if t.starts_with("refused") => Rcpt::Reply("550 5.1.1 no such mailbox".into()),
            t if t.starts_with("later") && attempt <= 1 => Rcpt::Reply("451 4.3.0 try again later".into()),
            _ => Rcpt::Accept,
        })
        .await;
        let smtp = plain(&sink);
        let err = smtp.send(message("refused@example.com", "x")).await.expect_err("refused");
        assert!(err.is_permanent(), "{err}");
        let err = smtp.send(message("later@example.com", "x")).await.expect_err("not yet");
        assert!(err.is_transient(), "{err}");
        smtp.send(message("later@example.com", "x")).await.expect("the second attempt is accepted");
        assert_eq!(sink.attempts("later@example.com"), 2);
        assert!(!sink.delivered_to("refused@example.com"));
        assert!(sink.delivered_to("later@example.com"));
    }

    #[tokio::test]
    async fn a_held_recipient_waits_for_the_release() {
        let sink = SmtpSink::with_rule(|_, _| Rcpt::Hold).await;
        let smtp = plain(&sink);
        let send = tokio::spawn(async move { smtp.send(message("slow@example.com", "x")).await });
        sink.holding(1).await;
        assert!(!send.is_finished() && sink.mail().is_empty());
        sink.release();
        send.await.unwrap().expect("accepted once released");
        assert!(sink.delivered_to("slow@example.com"));
    }

    #[tokio::test]
    async fn over_implicit_tls_a_client_that_trusts_the_authority_sends() {
        let dir = std::env::temp_dir().join(format!("smtp-sink-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let sink = SmtpSink::smtps(&dir).await;
        assert!(sink.url().starts_with("smtps://localhost:"));
        let ca = Certificate::from_pem(&std::fs::read(sink.ca_file.as_ref().unwrap()).unwrap()).unwrap();
        let tls = TlsParameters::builder("localhost".into()).add_root_certificate(ca).build().unwrap();
        let smtp = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
            .port(sink.port)
            .tls(Tls::Wrapper(tls))
            .build();
        smtp.send(message("ann@example.com", "over tls")).await.expect("sent over TLS");
        assert!(sink.messages()[0].contains("Subject: over tls"));
        // A plain client gets nowhere: no greeting in clear, nothing accepted.
        let client = plain(&sink);
        let sent = tokio::time::timeout(Duration::from_secs(2), client.send(message("bob@example.com", "x"))).await;
        assert!(!matches!(sent, Ok(Ok(_))));
        assert!(!sink.delivered_to("bob@example.com"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
