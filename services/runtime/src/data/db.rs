//! The service's own PostgreSQL database: created if missing, migrated at start.
//!
//! Two migration sets run on every database: the runtime's own tables (outbox,
//! inbox) from `migrations/runtime`, and the service's from
//! `migrations/<service>`. Their versions never overlap, and each migrator
//! ignores the other's rows in `_sqlx_migrations`.

use anyhow::Context;
use futures::FutureExt;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::time::Duration;

/// [`connect_with`] the default pool size.
pub async fn connect(url: &str, service_migrations: Migrator) -> anyhow::Result<PgPool> {
    connect_with(url, crate::HttpLimits::default().database_pool_size, service_migrations).await
}

/// Connections the PostgreSQL server at `url` (any database on it) still
/// accepts from ordinary roles: `max_connections` less the reserved ones
/// less the client connections open now.
pub async fn free_connections(url: &str) -> anyhow::Result<u32> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.with_context(|| format!("connecting to {}", redact(url)))?;
    let free: i64 = sqlx::query_scalar(
        "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
                - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    // Ours, counted above, is closed now.
    Ok(u32::try_from(free + 1).unwrap_or(0))
}

/// The pool size for each of `services` pools that share a server with
/// `free` connections left, each service also holding `extra` connections
/// outside its pool (its LISTEN connections): `requested`, or less when
/// the pools would not fit (at least 2). A pool larger than the server
/// allows fails only under load, when it grows: its requests then wait the
/// whole acquire timeout for a connection the server refuses.
pub fn fitted_pool_size(requested: u32, services: u32, extra: u32, free: u32) -> u32 {
    let fits = (free / services.max(1)).saturating_sub(extra);
    requested.min(fits).max(2)
}

/// Connects with a pool of `pool_size` connections (see `HttpLimits`).
pub async fn connect_with(url: &str, pool_size: u32, mut service_migrations: Migrator) -> anyhow::Result<PgPool> {
    connect_once(url, pool_size, &mut service_migrations).await
}

/// The first delay between connection attempts at start, and the longest.
pub const CONNECT_RETRY_BASE: Duration = Duration::from_millis(250);
pub const CONNECT_RETRY_CAP: Duration = Duration::from_secs(10);

/// [`connect_with`], waiting for a database that is away (down, restarting,
/// still starting up, refusing connections): each failed attempt is logged
/// and the next comes after a capped backoff ([`crate::backoff`]), until it
/// answers or `shutdown` (then `None`). Any other error (a wrong password, a
/// failing migration) ends it at once.
pub async fn connect_when_available(
    url: &str,
    pool_size: u32,
    mut service_migrations: Migrator,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<PgPool>> {
    let mut failures: u32 = 0;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = connect_once(url, pool_size, &mut service_migrations) => r,
        };
        match attempt {
            Ok(pool) => {
                if failures > 0 {
                    tracing::info!(database = %redact(url), failures, "database reachable; starting");
                }
                return Ok(Some(pool));
            }
            Err(e) if is_unavailable_anyhow(&e) => {
                let retry_in = crate::backoff::delay(failures, CONNECT_RETRY_BASE, CONNECT_RETRY_CAP);
                failures = failures.saturating_add(1);
                tracing::warn!(database = %redact(url), error = format!("{e:#}"), failures, ?retry_in,
                    "database not available at start; not ready, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(retry_in) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn connect_once(url: &str, pool_size: u32, service_migrations: &mut Migrator) -> anyhow::Result<PgPool> {
    create_if_missing(url).await?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size.max(1))
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let mut runtime = sqlx::migrate!("../../migrations/runtime");
    runtime.set_ignore_missing(true);
    runtime.run(&pool).await.context("runtime migrations")?;
    service_migrations.set_ignore_missing(true);
    service_migrations.run(&pool).await.context("service migrations")?;
    Ok(pool)
}

async fn create_if_missing(url: &str) -> anyhow::Result<()> {
    // The first connection: where a wrong address, password or `sslmode`
    // (a server without TLS) shows, with the URL it concerns.
    let exists =
        sqlx::Postgres::database_exists(url).await.with_context(|| format!("connecting to {}", redact(url)))?;
    if exists {
        return Ok(());
    }
    if let Err(e) = sqlx::Postgres::create_database(url).await {
        // Another replica may have created it meanwhile.
        if !sqlx::Postgres::database_exists(url).await? {
            return Err(e).with_context(|| format!("creating database {}", redact(url)));
        }
    }
    Ok(())
}

/// Whether `e` says the database cannot be reached or is not accepting work
/// (down, restarting, failing over, out of connections) rather than that the
/// statement itself failed: such an error is a dependency away, answered with
/// 503 and never counted against a message.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: admin/crash shutdown,
            // cannot connect now; 53300: too many connections; 25006: a
            // read-only transaction (a standby during failover).
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300" | "25006")
        }),
        _ => false,
    }
}

/// [`is_unavailable`] for any error in `e`'s chain.
pub fn is_unavailable_anyhow(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.downcast_ref::<sqlx::Error>().is_some_and(is_unavailable))
}

/// Waits until the database answers a query, with a growing pause between
/// tries; `false` if `shutdown` came first.
pub async fn wait_until_available(pool: &PgPool, shutdown: &tokio_util::sync::CancellationToken) -> bool {
    let mut pause = Duration::from_millis(100);
    loop {
        let ping = tokio::time::timeout(Duration::from_secs(5), sqlx::query!("SELECT 1 AS one").fetch_one(pool));
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            r = ping => if matches!(r, Ok(Ok(_))) { return true },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// A URL fit for logs: the password, if any, replaced.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Wakes a worker when a transaction that NOTIFYs `channel` commits, or after
/// `poll` as a safety net (a lost connection or notification delays the work,
/// never loses it).
pub struct Wakeup {
    pool: PgPool,
    channel: &'static str,
    listener: Option<sqlx::postgres::PgListener>,
    poll: Duration,
}

impl Wakeup {
    pub fn new(pool: PgPool, channel: &'static str, poll: Duration) -> Self {
        Wakeup { pool, channel, listener: None, poll }
    }

    /// Starts listening, if not yet. Call it before looking for work, so
    /// that a commit made while the work is done still wakes the next wait.
    pub async fn listen(&mut self) {
        if self.listener.is_some() {
            return;
        }
        let attempt = async {
            let mut l = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
            l.listen(self.channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match attempt.await {
            Ok(l) => self.listener = Some(l),
            Err(e) => tracing::warn!(channel = self.channel, error = %e, "LISTEN failed; polling"),
        }
    }

    /// Waits for a notification or the poll interval; `false` on shutdown.
    ///
    /// A notification wakes it together with every other one already
    /// received: each says only "a commit wrote work", and the work that
    /// follows the wakeup sees all the commits whose notifications it took
    /// (a notification is sent after its commit). So commits made while the
    /// worker was busy cost one look for work, not one each.
    pub async fn wait(&mut self, shutdown: &tokio_util::sync::CancellationToken) -> bool {
        self.listen().await;
        let notified = async {
            match self.listener.as_mut() {
                Some(l) => l.recv().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            r = notified => match r {
                Ok(()) => self.take_received(),
                Err(e) => {
                    tracing::warn!(channel = self.channel, error = %e, "listener lost");
                    self.listener = None;
                }
            },
            _ = tokio::time::sleep(self.poll) => self.take_received(),
        }
        true
    }

    /// Takes the notifications already received, without waiting for any.
    /// (`recv` is cancel-safe: a notification partly read
    /// stays in the connection's buffer for the next call.)
    fn take_received(&mut self) {
        let Some(listener) = self.listener.as_mut() else { return };
        loop {
            match listener.try_recv().now_or_never() {
                Some(Ok(Some(_))) => {}
                // Nothing more received yet.
                None => break,
                // The connection was lost (and is being re-established):
                // the caller looks for work anyway, so nothing is missed.
                Some(Ok(None)) => break,
                Some(Err(e)) => {
                    tracing::warn!(channel = self.channel, error = %e, "listener lost");
                    self.listener = None;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_urls_password_is_hidden_in_logs() {
        assert_eq!(redact("postgres://app:s3cret@db:5432/orders"), "postgres://app:***@db:5432/orders");
        assert_eq!(redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
    }

    #[test]
    fn a_url_without_a_password_is_kept() {
        for url in ["postgres://postgres@127.0.0.1:5432/x", "postgres://127.0.0.1/x", "not a url", ""] {
            assert_eq!(redact(url), url);
        }
    }

    #[test]
    fn pools_that_would_not_fit_the_server_are_shrunk_to_fit() {
        // 4 services of 40 with 3 listeners each on a server with 97 free: 21 each.
        assert_eq!(fitted_pool_size(40, 4, 3, 97), 21);
        assert!(4 * (fitted_pool_size(40, 4, 3, 97) + 3) <= 97);
        // Room enough: as requested.
        assert_eq!(fitted_pool_size(40, 4, 3, 397), 40);
        // Hardly any room: still a pool that can work.
        assert_eq!(fitted_pool_size(40, 4, 3, 5), 2);
    }

    #[tokio::test]
    async fn the_server_says_how_many_connections_it_still_accepts() {
        let url = std::env::var("POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let url = format!("{}/postgres", url.trim_end_matches('/'));
        let before = free_connections(&url).await.unwrap();
        let max: String = sqlx::query_scalar("SHOW max_connections").fetch_one(&test_server().await).await.unwrap();
        let max: u32 = max.parse().unwrap();
        assert!(before > 0 && before < max, "{before} free of {max}");
        // Connections held elsewhere are not free (others' tests come and go
        // meanwhile, so only an upper bound holds).
        let held = PgPoolOptions::new().min_connections(5).max_connections(5).connect(&url).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(held.size() == 5);
        let during = free_connections(&url).await.unwrap();
        assert!(during < max - 5, "{during} free of {max} with 5 held here");
        held.close().await;
    }

    #[test]
    fn a_password_with_an_at_sign_is_hidden_whole() {
        assert_eq!(redact("postgres://u:p@ss@host/db"), "postgres://u:***@host/db");
    }

    /// The test server (the e2e tests' PostgreSQL); NOTIFY needs no table.
    async fn test_server() -> PgPool {
        let url = std::env::var("POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&format!("{}/postgres", url.trim_end_matches('/')))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn one_wakeup_takes_every_notification_already_received() {
        let pool = test_server().await;
        // A channel of its own: tests run in parallel on a shared server.
        let channel: &'static str = format!("wakeup_test_{}", uuid::Uuid::new_v4().simple()).leak();
        let notify = || sqlx::query("SELECT pg_notify($1, '')").bind(channel).execute(&pool);
        let mut wakeup = Wakeup::new(pool.clone(), channel, Duration::from_secs(60));
        wakeup.listen().await;
        assert!(wakeup.listener.is_some(), "LISTEN failed");
        // Five commits while the worker is busy, all delivered by now.
        for _ in 0..5 {
            notify().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let woke = tokio::time::timeout(Duration::from_secs(10), wakeup.wait(&shutdown)).await;
        assert_eq!(woke.ok(), Some(true), "the notifications did not wake it");
        // One wakeup took them all: none is left to wake the next wait for
        // work the first one's look already saw.
        let left = wakeup.listener.as_mut().unwrap().try_recv().now_or_never();
        assert!(left.is_none(), "a notification was left for another wakeup: {left:?}");
        // A commit after it wakes the next wait (well before the 60 s poll).
        notify().await.unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(10), wakeup.wait(&shutdown)).await;
        assert_eq!(woke.ok(), Some(true), "a later notification did not wake it");
        shutdown.cancel();
        assert!(!wakeup.wait(&shutdown).await, "shutdown ends the wait");
    }

    #[test]
    fn a_database_that_cannot_be_reached_is_unavailable_a_failing_statement_is_not() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound("x".into())));
        let wrapped = anyhow::Error::from(sqlx::Error::PoolClosed).context("reading the account");
        assert!(is_unavailable_anyhow(&wrapped));
        assert!(!is_unavailable_anyhow(&anyhow::anyhow!("something else")));
    }
}
