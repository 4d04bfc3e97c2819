//! A test's own databases, RabbitMQ vhost and directories on the machine's
//! servers, so tests run in parallel without seeing each other's data or
//! messages; all removed when the [`Sandbox`] is dropped, also while a
//! failed test unwinds.

use crate::eventually;
use crate::servers::{amqp_base, management_url, postgres_url};
use serde_json::{Value, json};
use sqlx::migrate::Migrator;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// What a sandbox leaves on the servers until it is dropped.
#[derive(Default)]
struct Leftovers {
    databases: Vec<String>,
    vhost: Option<String>,
    dirs: Vec<PathBuf>,
}

pub struct Sandbox {
    /// Names everything of this sandbox: its vhost and `PREFIX_name` databases.
    pub prefix: String,
    /// The vhost's URL (one that refuses connections for [`Sandbox::without_broker`]).
    pub amqp_url: String,
    leftovers: Mutex<Leftovers>,
}

impl Sandbox {
    fn named(amqp_url: &str) -> Sandbox {
        runtime::telemetry::init_for_tests();
        Sandbox {
            prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            amqp_url: amqp_url.to_string(),
            leftovers: Default::default(),
        }
    }

    /// Databases and a vhost of their own.
    pub async fn new() -> Sandbox {
        let mut sandbox = Sandbox::named("");
        // Guarded before it is asked for: a slow broker may create it after a client timeout.
        sandbox.leftovers.lock().unwrap().vhost = Some(sandbox.prefix.clone());
        create_vhost(&sandbox.prefix).await;
        sandbox.amqp_url = format!("{}/{}", amqp_base(), sandbox.prefix);
        sandbox
    }

    /// Databases only; services get a broker URL that refuses connections.
    pub fn without_broker() -> Sandbox {
        Sandbox::named("amqp://guest:guest@127.0.0.1:1/%2f")
    }

    /// The vhost's name.
    pub fn vhost(&self) -> &str {
        &self.prefix
    }

    /// The URL of the sandbox's database `name`, dropped with the sandbox
    /// (created by whoever connects first: the services create theirs).
    pub fn database_url(&self, name: &str) -> String {
        let db = format!("{}_{name}", self.prefix);
        let mut leftovers = self.leftovers.lock().unwrap();
        if !leftovers.databases.contains(&db) {
            leftovers.databases.push(db.clone());
        }
        format!("{}/{db}", postgres_url())
    }

    /// The database `name`, created and migrated as a service does at start.
    pub async fn database(&self, name: &str, migrations: Migrator) -> sqlx::PgPool {
        runtime::data::db::connect(&self.database_url(name), migrations).await.expect("a database of the sandbox")
    }

    /// A directory of the sandbox (created), removed with it.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("order-system-{}-{name}", self.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        self.leftovers.lock().unwrap().dirs.push(dir.clone());
        dir
    }

    /// The names of `service`'s connections to the sandbox's vhost.
    pub async fn broker_connections(&self, service: &str) -> Vec<String> {
        broker_connections(&self.prefix, service).await
    }

    /// Messages ready in a queue of the vhost.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        queue_depth(&self.amqp_url, queue).await
    }

    /// Lowers the delivery limit of the sandbox's queues matching `pattern`
    /// to `limit` with an operator policy (as RabbitMQ 4 gives every quorum
    /// queue a limit of 20 by default; an operator policy applies beside the
    /// queue's arguments and user policies, the lowest limit winning), and
    /// waits until `queue` shows it.
    pub async fn lower_delivery_limit(&self, pattern: &str, limit: u32, queue: &str) {
        let http = reqwest::Client::new();
        let r = http
            .put(management_url(&["operator-policies", &self.prefix, "delivery-limit"]))
            .json(&json!({"pattern": pattern, "definition": {"delivery-limit": limit}, "apply-to": "queues"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "setting the policy: {}", r.status());
        eventually(Duration::from_secs(20), || async {
            let q: Value =
                http.get(management_url(&["queues", &self.prefix, queue])).send().await.ok()?.json().await.ok()?;
            (q["operator_policy"] == "delivery-limit").then_some(())
        })
        .await;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let leftovers = std::mem::take(&mut *self.leftovers.lock().unwrap());
        // Drop cannot await, and may run while a failed test unwinds inside
        // its runtime: a thread of its own with a runtime of its own cleans up.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if !leftovers.databases.is_empty()
                    && let Ok(pool) = sqlx::PgPool::connect(&format!("{}/postgres", postgres_url())).await
                {
                    for db in &leftovers.databases {
                        let sql = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
                        let _ = sqlx::query(&sql).execute(&pool).await;
                    }
                    pool.close().await;
                }
                if let Some(vhost) = &leftovers.vhost {
                    let _ = reqwest::Client::new().delete(management_url(&["vhosts", vhost])).send().await;
                }
            });
            for dir in leftovers.dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
        })
        .join();
    }
}

async fn create_vhost(name: &str) {
    let http = reqwest::Client::new();
    let r = http
        .put(management_url(&["vhosts", name]))
        .send()
        .await
        .expect("RabbitMQ management API (enable rabbitmq_management)");
    assert!(r.status().is_success(), "creating vhost {name}: {}", r.status());
    let r = http
        .put(management_url(&["permissions", name, "guest"]))
        .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "permissions on {name}: {}", r.status());
}

/// The names of `service`'s connections to `vhost`, once the broker lists at
/// least one (its list lags a few seconds behind).
pub async fn broker_connections(vhost: &str, service: &str) -> Vec<String> {
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), || async {
        let list: Vec<Value> =
            http.get(management_url(&["vhosts", vhost, "connections"])).send().await.ok()?.json().await.ok()?;
        let names: Vec<String> = list
            .iter()
            .filter(|c| c["client_properties"]["connection_name"] == service)
            .filter_map(|c| Some(c["name"].as_str()?.to_string()))
            .collect();
        (!names.is_empty()).then_some(names)
    })
    .await
}

/// Closes connections from the broker's side, as a broker shutdown or an
/// operator does (the client gets CONNECTION_FORCED).
pub async fn close_broker_connections(names: &[String]) {
    let http = reqwest::Client::new();
    for name in names {
        let r = http.delete(management_url(&["connections", name])).header("x-reason", "test").send().await.unwrap();
        assert!(r.status().is_success(), "closing {name}: {}", r.status());
    }
}

/// Messages ready in `queue` of the vhost at `amqp_url` (the broker's own
/// count, not the management API's sampled statistics).
pub async fn queue_depth(amqp_url: &str, queue: &str) -> u32 {
    let conn = lapin::Connection::connect(amqp_url, Default::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    declared.message_count()
}

/// One service's database in a sandbox of its own, without a broker, for the
/// tests of a service's rules: migrated as the service does at start, dropped
/// when the test ends, also when it fails.
pub struct ServiceDb {
    pub pool: sqlx::PgPool,
    /// The database's name on the server.
    pub name: String,
    /// Declared last: dropped after the pool.
    _sandbox: Sandbox,
}

impl ServiceDb {
    /// `service`'s database (`<prefix>_<service>`), migrated with `migrations`.
    pub async fn new(service: &str, migrations: Migrator) -> ServiceDb {
        let sandbox = Sandbox::without_broker();
        let pool = sandbox.database(service, migrations).await;
        ServiceDb { pool, name: format!("{}_{service}", sandbox.prefix), _sandbox: sandbox }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn databases_named(prefix: &str) -> Vec<String> {
        let pool = sqlx::PgPool::connect(&format!("{}/postgres", postgres_url())).await.unwrap();
        let names = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
            .bind(format!("{prefix}\\_%"))
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        names
    }

    async fn vhost_exists(name: &str) -> bool {
        let r = reqwest::Client::new().get(management_url(&["vhosts", name])).send().await.unwrap();
        r.status().is_success()
    }

    #[tokio::test]
    async fn a_failing_test_leaves_no_database_vhost_or_directory() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let failing = tokio::spawn(async move {
            let sandbox = Sandbox::new().await;
            let pool = sandbox.database("scratch", sqlx::migrate!("../../migrations/ordering")).await;
            let dir = sandbox.dir("mail");
            tx.send((sandbox.prefix.clone(), dir)).unwrap();
            let _in_use = pool;
            panic!("the test fails with its sandbox in use");
        });
        assert!(failing.await.unwrap_err().is_panic());
        let (prefix, dir) = rx.await.unwrap();
        assert!(databases_named(&prefix).await.is_empty(), "databases of {prefix} left behind");
        assert!(!vhost_exists(&prefix).await, "the vhost {prefix} was left behind");
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }

    #[tokio::test]
    async fn a_sandbox_has_its_own_database_and_vhost_while_it_lives() {
        let sandbox = Sandbox::new().await;
        let pool = sandbox.database("scratch", sqlx::migrate!("../../migrations/ordering")).await;
        let name: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&pool).await.unwrap();
        assert_eq!(name, format!("{}_scratch", sandbox.prefix));
        assert!(vhost_exists(sandbox.vhost()).await);
        let conn = lapin::Connection::connect(&sandbox.amqp_url, Default::default()).await.expect("the vhost answers");
        let _ = conn.close(200, "done".into()).await;
        pool.close().await;
    }

    #[tokio::test]
    async fn without_a_broker_the_amqp_url_refuses_and_no_vhost_is_made() {
        let sandbox = Sandbox::without_broker();
        assert!(lapin::Connection::connect(&sandbox.amqp_url, Default::default()).await.is_err());
        assert!(!vhost_exists(sandbox.vhost()).await);
    }
}
