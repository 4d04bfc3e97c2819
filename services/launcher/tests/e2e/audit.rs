//! Billing's ledger and `order-system audit`: every money movement is an
//! entry whose running sum is the balance, and the audit reports each kind of
//! broken invariant once it is made to happen in a test's databases.

use crate::helpers::{Sandbox, TestApp, User, eventually, postgres_url, rabbitmq_api};
use order_system::audit::{self, AuditConfig, Report};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

async fn order(app: &TestApp, user: &User, price: u32) -> (Uuid, Value) {
    let id = app.place_order(user, price).await;
    let settled = app.settled_order(user, &id).await;
    (id.parse().unwrap(), settled)
}

type Entry = (String, String, Option<Uuid>, Decimal, Decimal);

async fn ledger(app: &TestApp, user: &User) -> Vec<Entry> {
    let billing = app.db("billing").await;
    let rows = sqlx::query_as(
        "SELECT kind, source, payment_id, amount, balance_after FROM ledger_entries WHERE user_id = $1 ORDER BY id",
    )
    .bind(user.id)
    .fetch_all(&billing)
    .await
    .unwrap();
    billing.close().await;
    rows
}

#[tokio::test]
async fn every_money_movement_is_a_ledger_entry_and_the_balance_is_their_sum() {
    let app = TestApp::spawn().await;
    let user = app.user_with(1000).await;
    let r = app.post(&user, "/billing/account/withdraw", json!({"amount": 100})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Refused withdrawal and failed order: no money moves, no entry.
    let r = app.post(&user, "/billing/account/withdraw", json!({"amount": 5000})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let (paid, settled) = order(&app, &user, 600).await;
    assert_eq!(settled["status"], "succeeded");
    let (_, settled) = order(&app, &user, 500).await;
    assert_eq!(settled["status"], "failed");

    let entries = ledger(&app, &user).await;
    let summary: Vec<(&str, Option<Uuid>, Decimal, Decimal)> =
        entries.iter().map(|(k, _, p, a, b)| (k.as_str(), *p, *a, *b)).collect();
    assert_eq!(
        summary,
        vec![
            ("deposit", None, dec("1000"), dec("1000")),
            ("withdrawal", None, dec("-100"), dec("900")),
            ("payment", Some(paid), dec("-600"), dec("300")),
        ]
    );
    // Each names the request or message it came from.
    assert!(entries[0].1.starts_with("request:") && entries[0].1.len() > "request:".len() + 8, "{:?}", entries[0]);
    assert!(entries[1].1.starts_with("request:") && entries[1].1 != entries[0].1, "{:?}", entries[1]);
    assert!(entries[2].1.starts_with("message:"), "{:?}", entries[2]);
    let sum: Decimal = entries.iter().map(|e| e.3).sum();
    assert_eq!(Decimal::try_from(app.balance(&user).await).unwrap(), sum);

    // Append-only: an entry can be neither changed nor removed.
    let billing = app.db("billing").await;
    for sql in
        ["UPDATE ledger_entries SET amount = amount * 2", "DELETE FROM ledger_entries", "TRUNCATE ledger_entries"]
    {
        let err = sqlx::query(sql).execute(&billing).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    // A payment is entered once, whatever the path: the ledger refuses a second entry.
    let err = sqlx::query(
        "INSERT INTO ledger_entries (user_id, kind, source, payment_id, amount, balance_after)
         VALUES ($1, 'payment', 'test', $2, -1, 299)",
    )
    .bind(user.id)
    .bind(paid)
    .execute(&billing)
    .await
    .expect_err("a second entry for one payment");
    assert!(err.to_string().contains("ledger_entries_payment_id_key"), "{err}");
    billing.close().await;
    app.stop().await;
}

#[tokio::test]
async fn concurrent_deposits_withdrawals_and_payments_keep_the_balance_equal_to_the_ledger() {
    let app = TestApp::spawn().await;
    let user = app.user_with(500).await;
    let calls = (0..30).map(|i| {
        let app = &app;
        let user = &user;
        async move {
            match i % 3 {
                0 => app.post(user, "/billing/account/deposit", json!({"amount": 7})).await.status(),
                1 => app.post(user, "/billing/account/withdraw", json!({"amount": 40})).await.status(),
                _ => app.post(user, "/ordering/orders", json!({"price": 45})).await.status(),
            }
        }
    });
    let statuses = futures::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| s.is_success() || *s == StatusCode::UNPROCESSABLE_ENTITY), "{statuses:?}");
    // Clean once every order is final and notified. Every report, taken
    // while orders settle, sees each order once: final or pending (the audit
    // reads them all at one moment).
    let orders = statuses.iter().skip(2).step_by(3).filter(|s| s.is_success()).count();
    let count = |report: &audit::Report, prefix: &str| -> usize {
        let line = report.checked.iter().find(|l| l.starts_with(prefix)).expect(prefix);
        line[prefix.len()..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    eventually(Duration::from_secs(30), || async {
        let report = audit::run(&app.audit_config()).await.unwrap();
        let (finals, pending) = (count(&report, "final orders: "), count(&report, "pending orders: "));
        assert_eq!(finals + pending, orders, "each order final or pending: {report}");
        (report.is_clean() && finals == orders).then_some(())
    })
    .await;
    let entries = ledger(&app, &user).await;
    let sum: Decimal = entries.iter().map(|e| e.3).sum();
    assert_eq!(Decimal::try_from(app.balance(&user).await).unwrap(), sum);
    assert!(entries.iter().all(|e| e.4 >= Decimal::ZERO));
    assert_eq!(orders, 10, "every order accepted: {statuses:?}");
    app.stop().await;
}

#[tokio::test]
async fn existing_accounts_open_the_ledger_with_their_balance() {
    // A billing database as it was before the ledger, with two accounts.
    let sandbox = Sandbox::without_broker();
    let url = sandbox.database_url("ledger_migration");
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", postgres_url())).await.unwrap();
    let name = url.rsplit('/').next().unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await.unwrap();
    admin.close().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let all = sqlx::migrate!("../../migrations/billing");
    let mut before = sqlx::migrate!("../../migrations/billing");
    before.migrations =
        all.migrations.iter().filter(|m| m.version < 20261130000001).cloned().collect::<Vec<_>>().into();
    before.run(&db).await.unwrap();
    let (rich, empty) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query("INSERT INTO accounts (user_id, balance) VALUES ($1, 123.45), ($2, 0)")
        .bind(rich)
        .bind(empty)
        .execute(&db)
        .await
        .unwrap();

    all.run(&db).await.unwrap();
    let entries: Vec<(Uuid, String, String, Decimal, Decimal)> =
        sqlx::query_as("SELECT user_id, kind, source, amount, balance_after FROM ledger_entries ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(entries, vec![(rich, "opening".into(), "migration".into(), dec("123.45"), dec("123.45"))]);
    db.close().await;
}

impl TestApp {
    fn audit_config(&self) -> AuditConfig {
        let db = |s: &str| format!("{}/{}_{s}", postgres_url(), self.prefix);
        AuditConfig {
            billing_db: db("billing"),
            ordering_db: db("ordering"),
            notification_db: db("notification"),
            rabbitmq_api: rabbitmq_api(),
            vhost: self.vhost.name.clone(),
            amqp_url: Some(self.vhost.amqp_url.clone()),
            pending_threshold: Duration::from_secs(60),
            notification_grace: Duration::ZERO,
        }
    }

    /// `order-system audit` as an operator runs it: its output and exit code.
    async fn audit_command(&self) -> (String, Option<i32>) {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-system"))
            .arg("audit")
            .arg("--pending-threshold-secs=60")
            .arg("--notification-grace-secs=0")
            .env("POSTGRES_URL", postgres_url())
            .env("DATABASE_PREFIX", format!("{}_", self.prefix))
            .env("AMQP_URL", &self.vhost.amqp_url)
            .env("RABBITMQ_API_URL", rabbitmq_api())
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), out.status.code())
    }
}

fn has(report: &Report, check: &str, subject: &str, detail: &str) -> bool {
    report.of(check).iter().any(|v| v.subject.contains(subject) && v.detail.contains(detail))
}

#[tokio::test]
async fn the_audit_reports_each_broken_invariant() {
    // Ordering's sweeper would settle the order left pending below.
    let app = TestApp::spawn_with(crate::helpers::sweeper_off).await;
    let (ann, bob) = (app.user().await, app.user().await);
    app.deposit(&ann, 1000).await;
    app.deposit(&bob, 1000).await;
    let (repriced, _) = order(&app, &ann, 100).await;
    let (unnotified, _) = order(&app, &ann, 110).await;
    let (twice_notified, _) = order(&app, &ann, 120).await;
    let (flipped, _) = order(&app, &bob, 130).await;
    let (_, failed) = order(&app, &bob, 5000).await;
    assert_eq!(failed["status"], "failed");

    // Healthy: nothing to report, and the command exits 0.
    let report = eventually(Duration::from_secs(20), || async {
        let report = audit::run(&app.audit_config()).await.unwrap();
        (report.is_clean() && report.checked.iter().any(|l| l.contains("final orders: 5"))).then_some(report)
    })
    .await;
    assert!(report.checked.iter().any(|l| l.contains("pending orders: 0")), "{report}");
    let (out, code) = app.audit_command().await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no violations"), "{out}");

    // Now break one invariant of each kind.
    let billing = app.db("billing").await;
    let ordering = app.db("ordering").await;
    let notification = app.db("notification").await;
    let exec = |db: &sqlx::PgPool, sql: &'static str, id: Uuid| {
        let db = db.clone();
        async move { sqlx::query(sql).bind(id).execute(&db).await.unwrap() }
    };
    // A balance changed without a ledger entry.
    exec(&billing, "UPDATE accounts SET balance = balance + 5 WHERE user_id = $1", bob.id).await;
    // A payment whose amount is not the order's (and not what the ledger charged).
    exec(&billing, "UPDATE payments SET amount = amount + 1 WHERE id = $1", repriced).await;
    // A final order without its notification, another with two.
    exec(
        &notification,
        "DELETE FROM email_deliveries WHERE notification_id IN (SELECT id FROM notifications WHERE order_id = $1)",
        unnotified,
    )
    .await;
    exec(&notification, "DELETE FROM notifications WHERE order_id = $1", unnotified).await;
    exec(
        &notification,
        "INSERT INTO notifications (id, user_id, order_id, message) SELECT gen_random_uuid(), user_id, order_id, message FROM notifications WHERE order_id = $1",
        twice_notified,
    )
    .await;
    // An order whose outcome is not its payment's.
    exec(&ordering, "UPDATE orders SET status = 'failed', reason = 'x' WHERE id = $1", flipped).await;
    // An order pending for an hour, and a final one billing never heard of.
    let (stuck, unpaid) = (Uuid::new_v4(), Uuid::new_v4());
    exec(&ordering, "INSERT INTO orders (id, user_id, price, created_at) VALUES ($1, gen_random_uuid(), 9, now() - interval '1 hour')", stuck).await;
    exec(
        &ordering,
        "INSERT INTO orders (id, user_id, price, status) VALUES ($1, gen_random_uuid(), 9, 'succeeded')",
        unpaid,
    )
    .await;
    // A ledger entry whose balance after it is not the running sum.
    sqlx::query(
        "INSERT INTO ledger_entries (user_id, kind, source, amount, balance_after) VALUES ($1, 'deposit', 'test', 1, 7)",
    )
    .bind(ann.id)
    .execute(&billing)
    .await
    .unwrap();
    // A dead-lettered message.
    app.publish_raw("", "billing.payments.dead", Some(&Uuid::new_v4().to_string()), "CreatePayment", b"{}").await;

    // The management API's counts are sampled every few seconds.
    let report = eventually(Duration::from_secs(30), || async {
        let report = audit::run(&app.audit_config()).await.unwrap();
        (!report.of(audit::DEAD_LETTERS).is_empty()).then_some(report)
    })
    .await;
    let bob_s = bob.id.to_string();
    let ann_s = ann.id.to_string();
    assert!(has(&report, audit::BALANCE, &bob_s, "balance 875.00 but its ledger entries sum to 870.00"), "{report}");
    assert!(has(&report, audit::BALANCE, &ann_s, "balance 670.00 but its ledger entries sum to 671.00"), "{report}");
    assert!(has(&report, audit::LEDGER, &ann_s, "says balance 7.00 after it"), "{report}");
    assert!(
        has(&report, audit::PAYMENT, &repriced.to_string(), "price 100.00 but its payment is for 101.00"),
        "{report}"
    );
    assert!(
        has(&report, audit::LEDGER, &repriced.to_string(), "succeeded for 101.00 but its ledger entries charge 100.00"),
        "{report}"
    );
    assert!(has(&report, audit::NOTIFICATION, &unnotified.to_string(), "no notification"), "{report}");
    assert!(has(&report, audit::NOTIFICATION, &twice_notified.to_string(), "2 notifications"), "{report}");
    assert!(has(&report, audit::PAYMENT, &flipped.to_string(), "failed but its payment succeeded"), "{report}");
    assert!(has(&report, audit::PENDING, &stuck.to_string(), "pending for 36"), "{report}");
    assert!(has(&report, audit::PAYMENT, &unpaid.to_string(), "no payment"), "{report}");
    assert!(has(&report, audit::NOTIFICATION, &unpaid.to_string(), "no notification"), "{report}");
    assert!(has(&report, audit::DEAD_LETTERS, "billing.payments.dead", "1 dead-lettered"), "{report}");
    // With its cause and reason (it names none: poison).
    assert!(has(&report, audit::DEAD_LETTERS, "billing.payments.dead", "1 poison, 0 transient"), "{report}");
    assert!(has(&report, audit::DEAD_LETTERS, "billing.payments.dead", "no reason recorded"), "{report}");
    assert_eq!(report.violations.len(), 12, "{report}");

    // Orders settled within the grace are not checked for notifications yet
    // (still on their way); everything else is reported all the same.
    let lenient = AuditConfig { notification_grace: Duration::from_secs(3600), ..app.audit_config() };
    let report = audit::run(&lenient).await.unwrap();
    assert!(report.of(audit::NOTIFICATION).is_empty(), "{report}");
    assert!(report.checked.iter().any(|l| l.contains("0 checked, 6 settled within the last 3600 s")), "{report}");
    assert_eq!(report.violations.len(), 9, "{report}");

    let (out, code) = app.audit_command().await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("12 violation(s)") && out.contains(&stuck.to_string()) && out.contains(&bob_s), "{out}");
    for db in [billing, ordering, notification] {
        db.close().await;
    }
    app.stop().await;
}

/// `order-system internal-keys` whose reader is gone before it writes (as
/// `| head` may be) exits 0 instead of panicking on the broken pipe.
#[test]
fn internal_keys_to_a_closed_pipe_is_not_a_panic() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_order-system"))
        .arg("internal-keys")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", out.status);
}
