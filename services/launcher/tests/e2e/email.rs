//! E-mail as a recipient's mail system receives it, read from the test's SMTP
//! server: `multipart/alternative` (text and escaped HTML), a `Message-ID`
//! derived from the notification, `List-Unsubscribe` with RFC 8058's one-click
//! POST, and a DKIM signature that a real verifier (dkimpy) accepts against
//! the configured key. Unsubscribing stops the e-mails and keeps the
//! notifications; a link this system did not sign is refused.

use crate::helpers::{TestApp, assert_error, eventually, eventually_counts};
use notification::unsubscribe::{Links, UnsubscribeConfig};
use reqwest::StatusCode;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

const SELECTOR: &str = "mail2026";
const DOMAIN: &str = "orders.example";
const PUBLIC_URL: &str = "https://orders.example";
const SECRET: &str = "a test secret that is long enough to sign with";

/// An RSA key pair made with openssl, as `docs/email.md` makes one, in a
/// directory removed with it.
struct DkimKey {
    dir: PathBuf,
}

impl DkimKey {
    fn generate() -> DkimKey {
        let dir = std::env::temp_dir().join(format!("dkim-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = DkimKey { dir };
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl").args(args).current_dir(&key.dir).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["genrsa", "-traditional", "-out", "private.pem", "2048"]);
        run(&["rsa", "-in", "private.pem", "-pubout", "-out", "public.pem"]);
        key
    }

    fn private(&self) -> PathBuf {
        self.dir.join("private.pem")
    }

    fn public(&self) -> PathBuf {
        self.dir.join("public.pem")
    }

    /// Whether dkimpy verifies `message`'s signature with this key published
    /// at `SELECTOR._domainkey.DOMAIN`.
    fn verifies(&self, message: &str) -> bool {
        let file = self.dir.join(format!("{}.eml", Uuid::new_v4().simple()));
        std::fs::write(&file, message).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/dkim-verify.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg(&file)
            .arg(self.public())
            .args([SELECTOR, DOMAIN])
            .output()
            .expect("python3 with dkimpy (pip install dkimpy)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("Traceback"), "the verifier broke: {stderr}");
        if !out.status.success() {
            eprintln!("dkim-verify: {stderr}");
        }
        out.status.success()
    }
}

impl Drop for DkimKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unsubscribe_config() -> UnsubscribeConfig {
    UnsubscribeConfig {
        public_url: Some(PUBLIC_URL.parse().unwrap()),
        unsubscribe_secret: Some(SECRET.into()),
        unsubscribe_mailto: Some(format!("unsubscribe@{DOMAIN}")),
    }
}

/// A received message: its header fields (unfolded, in order) and body.
struct Mail {
    headers: Vec<(String, String)>,
    body: String,
}

impl Mail {
    fn parse(raw: &str) -> Mail {
        let raw = raw.replace("\r\n", "\n");
        let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                let last = headers.last_mut().expect("a continuation after a field");
                last.1.push(' ');
                last.1.push_str(line.trim());
            } else if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        Mail { headers, body: body.to_string() }
    }

    /// The one field named `name` (case-insensitive).
    fn header(&self, name: &str) -> &str {
        let found: Vec<&str> =
            self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect();
        assert_eq!(found.len(), 1, "one {name} field: {:?}", self.headers);
        found[0]
    }

    /// The body as its `Content-Transfer-Encoding` says (7bit or quoted-printable).
    fn decoded(&self) -> String {
        let encoding = self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("Content-Transfer-Encoding"));
        match encoding.map(|(_, v)| v.to_ascii_lowercase()).as_deref() {
            None | Some("7bit") | Some("8bit") => self.body.clone(),
            Some("quoted-printable") => {
                let soft = self.body.replace("=\n", "");
                let mut out = Vec::new();
                let mut bytes = soft.bytes();
                while let Some(b) = bytes.next() {
                    if b == b'=' {
                        let hex: String =
                            [bytes.next().unwrap(), bytes.next().unwrap()].iter().map(|&c| c as char).collect();
                        out.push(u8::from_str_radix(&hex, 16).expect("=XX"));
                    } else {
                        out.push(b);
                    }
                }
                String::from_utf8(out).unwrap()
            }
            Some(other) => panic!("unexpected transfer encoding {other}"),
        }
    }

    /// The parts of a multipart body, each parsed as a message.
    fn parts(&self) -> Vec<Mail> {
        let content_type = self.header("Content-Type");
        let boundary = content_type
            .split(';')
            .find_map(|p| p.trim().strip_prefix("boundary="))
            .expect("a boundary")
            .trim_matches('"');
        let delimiter = format!("--{boundary}");
        let mut parts: Vec<&str> = self.body.split(delimiter.as_str()).collect();
        assert!(parts.pop().expect("a closing delimiter").starts_with("--"), "closed with {delimiter}--");
        parts.into_iter().skip(1).map(|p| Mail::parse(p.trim_start_matches('\n'))).collect()
    }
}

/// The single e-mail sent to `email`, once it arrived.
async fn mail_to(app: &TestApp, email: &str) -> String {
    eventually(Duration::from_secs(15), || async {
        let mut found: Vec<String> = app.smtp.messages().into_iter().filter(|m| m.contains(email)).collect();
        assert!(found.len() <= 1, "one e-mail to {email}: {found:?}");
        found.pop()
    })
    .await
}

#[tokio::test]
async fn an_order_email_is_multipart_signed_and_unsubscribes_in_one_click() {
    let key = DkimKey::generate();
    let app = TestApp::spawn_with(|c| {
        c.mail.dkim = notification::DkimSettings {
            dkim_selector: Some(SELECTOR.into()),
            dkim_domain: Some(DOMAIN.into()),
            dkim_private_key_file: Some(key.private()),
        };
        c.mail.unsubscribe = unsubscribe_config();
    })
    .await;
    let user = app.user_with(1000).await;
    let id = app.place_order(&user, 600).await;
    assert_eq!(app.settled_order(&user, &id).await["status"], "succeeded");

    let raw = mail_to(&app, &user.email).await;
    let mail = Mail::parse(&raw);
    let notifications: Vec<Value> = app.get(&user, "/notifications").await;
    assert_eq!(notifications.len(), 1);
    let notification_id = notifications[0]["id"].as_str().unwrap();
    let text = "Your order for 600.00$ has been successfully processed";

    // The same message every time it is sent: its id is the notification's.
    assert_eq!(mail.header("Message-ID"), format!("<notification-{notification_id}@{DOMAIN}>"));
    assert_eq!(mail.header("Subject"), "Your order has been processed");

    // One-click unsubscribe (RFC 8058): an https link, a mailto, and the POST marker.
    let list_unsubscribe = mail.header("List-Unsubscribe");
    let link = list_unsubscribe
        .strip_prefix('<')
        .and_then(|v| v.split_once('>'))
        .map(|(link, _)| link.to_string())
        .expect("the link first");
    assert!(link.starts_with(&format!("{PUBLIC_URL}/api/v1/notifications/unsubscribe?token=")), "{link}");
    assert!(list_unsubscribe.contains(&format!(", <mailto:unsubscribe@{DOMAIN}?subject=")), "{list_unsubscribe}");
    assert_eq!(mail.header("List-Unsubscribe-Post"), "List-Unsubscribe=One-Click");

    // multipart/alternative: the text, then the HTML (the richer one last).
    assert!(mail.header("Content-Type").starts_with("multipart/alternative"), "{}", mail.header("Content-Type"));
    let parts = mail.parts();
    assert_eq!(parts.len(), 2);
    assert!(parts[0].header("Content-Type").starts_with("text/plain"), "{}", parts[0].header("Content-Type"));
    let plain = parts[0].decoded();
    assert!(plain.contains(text), "{plain}");
    assert!(plain.contains(&link), "the text part has the link: {plain}");
    assert!(parts[1].header("Content-Type").starts_with("text/html"), "{}", parts[1].header("Content-Type"));
    let html = parts[1].decoded();
    assert!(html.contains(&format!("<p>{text}</p>")), "{html}");
    assert!(html.contains(&format!("<a href=\"{link}\">")), "{html}");

    // Signed by the configured key, covering the unsubscribe headers (RFC 8058 asks for it).
    let signature = mail.header("DKIM-Signature");
    assert!(
        signature.contains(&format!("d={DOMAIN};")) && signature.contains(&format!("s={SELECTOR};")),
        "{signature}"
    );
    let signed = signature.split(';').find_map(|t| t.trim().strip_prefix("h=")).expect("h=").to_lowercase();
    for header in ["from", "to", "subject", "message-id", "list-unsubscribe", "list-unsubscribe-post"] {
        assert!(signed.split(':').any(|h| h.trim() == header), "{header} is signed: {signed}");
    }
    assert!(key.verifies(&raw), "the DKIM signature verifies against the configured public key");
    // The verifier can tell: a changed body or a changed signed header fails.
    assert!(!key.verifies(&raw.replacen("600.00$", "6000.00$", 1)), "a changed body fails");
    assert!(!key.verifies(&raw.replacen("Subject: Your order", "Subject: Our order", 1)), "a changed subject fails");
    let other = DkimKey::generate();
    assert!(!other.verifies(&raw), "another key does not verify it");

    // The link opens a page that asks to confirm, and unsubscribes nobody by itself.
    let token = link.split_once("token=").unwrap().1.to_string();
    let unsubscribe = app.url(&format!("/notifications/unsubscribe?token={token}"));
    let page = app.http.get(&unsubscribe).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("<form method=\"post\""), "{html}");
    let db = app.db("notification").await;
    let unsubscribed = "SELECT count(*) FROM email_unsubscribes WHERE user_id = $1";
    let count = || async { sqlx::query_scalar::<_, i64>(unsubscribed).bind(user.id).fetch_one(&db).await.unwrap() };
    assert_eq!(count().await, 0, "the page alone unsubscribes nobody");

    // The mail client's one-click POST, with no login; again changes nothing more.
    for _ in 0..2 {
        let r = app
            .http
            .post(&unsubscribe)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(count().await, 1);
    }

    // The next order is still notified, but not mailed.
    let id = app.place_order(&user, 100).await;
    assert_eq!(app.settled_order(&user, &id).await["status"], "succeeded");
    eventually(Duration::from_secs(10), || async {
        let list: Vec<Value> = app.get(&user, "/notifications").await;
        (list.len() == 2).then_some(())
    })
    .await;
    let dropped =
        "SELECT count(*) FROM email_deliveries WHERE user_id = $1 AND suppressed_at IS NOT NULL AND sent_at IS NULL";
    eventually_counts(Duration::from_secs(10), &db, dropped, user.id, 1).await;
    let sent: Vec<String> = app.smtp.messages().into_iter().filter(|m| m.contains(&user.email)).collect();
    assert_eq!(sent.len(), 1, "no e-mail after unsubscribing");
    app.stop().await;
}

#[tokio::test]
async fn an_unsubscribe_link_this_system_did_not_sign_is_refused() {
    let app = TestApp::spawn_with(|c| c.mail.unsubscribe = unsubscribe_config()).await;
    let user = app.user().await;
    let call = |method: reqwest::Method, query: String| {
        let url = app.url(&format!("/notifications/unsubscribe{query}"));
        app.http.request(method, url).send()
    };
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        // Not a token at all.
        assert_error(
            call(method.clone(), "?token=not-a-token".into()).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "not an unsubscribe link",
        )
        .await;
        let missing = call(method.clone(), String::new()).await.unwrap();
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        // The user's id signed with another key: a forgery.
        let forger = Links::from_config(&UnsubscribeConfig {
            unsubscribe_secret: Some("somebody else's secret, long enough".into()),
            ..unsubscribe_config()
        })
        .unwrap()
        .unwrap();
        let forged = forger.token(user.id);
        assert_error(
            call(method.clone(), format!("?token={forged}")).await.unwrap(),
            StatusCode::FORBIDDEN,
            "not valid",
        )
        .await;
    }
    let db = app.db("notification").await;
    let unsubscribed: i64 = sqlx::query_scalar("SELECT count(*) FROM email_unsubscribes").fetch_one(&db).await.unwrap();
    assert_eq!(unsubscribed, 0, "no refused link unsubscribed anyone");
    // The genuine token works, so the refusals above were about the tokens.
    let genuine = Links::from_config(&unsubscribe_config()).unwrap().unwrap().token(user.id);
    assert_eq!(call(reqwest::Method::POST, format!("?token={genuine}")).await.unwrap().status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn without_an_unsubscribe_secret_the_endpoint_refuses_every_link() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let token = Links::from_config(&unsubscribe_config()).unwrap().unwrap().token(user.id);
    let r = app.http.post(app.url(&format!("/notifications/unsubscribe?token={token}"))).send().await.unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "not in use").await;
    app.stop().await;
}
