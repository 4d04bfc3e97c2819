//! The throwaway profile (`order-system run --throwaway`): a whole system
//! for a script, a benchmark or a fuzzer, beside whatever else runs on the
//! machine. Every service listens on a free port the kernel picks; the
//! databases are `<name>_identity`, ...; the RabbitMQ vhost is `<name>`,
//! created through the management API; throttles are off unless THROTTLES
//! says otherwise; e-mails go to a directory of its own. Where it listens is
//! written to `--env-file` as shell assignments once every listener is
//! bound. At exit (also on SIGINT/SIGTERM, and when it fails to start) the
//! databases, the vhost, the mail directory and the file are removed.

use crate::audit::{management_request, percent_encode};
use crate::system::{Listeners, Service, System, SystemConfig, Throttles};
use anyhow::Context;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Clone, Debug)]
pub struct ThrowawayArgs {
    /// A throwaway system: free ports, its own databases and vhost,
    /// throttles off, all removed at exit.
    #[arg(long)]
    pub throwaway: bool,

    /// Its name: the prefix of its databases (`<name>_identity`, ...) and its
    /// vhost (default `throwaway<pid>`). Letters, digits and `_`.
    #[arg(long, requires = "throwaway")]
    pub name: Option<String>,

    /// Once every listener is bound, write where the services are to this
    /// file as shell assignments (GATEWAY_URL=http://127.0.0.1:PORT,
    /// GATEWAY_PORT, IDENTITY_URL, ..., DATABASE_PREFIX, AMQP_VHOST,
    /// MAIL_DIR, SYSTEM_PID); it is written whole (renamed into place).
    #[arg(long, requires = "throwaway")]
    pub env_file: Option<PathBuf>,

    /// Use AMQP_URL's vhost as it is (a broker of the caller's own, e.g. a
    /// private node) instead of creating and removing one.
    #[arg(long, requires = "throwaway")]
    pub shared_vhost: bool,

    /// RabbitMQ management API (credentials in the URL), to create and
    /// delete the vhost.
    #[arg(long, env = "RABBITMQ_API_URL", default_value = "http://guest:guest@127.0.0.1:15672/api")]
    pub rabbitmq_api: String,
}

/// What a throwaway system leaves behind to remove.
struct Leftovers {
    server_url: String,
    prefix: String,
    /// The management API and the vhost, when it created one.
    vhost: Option<(String, String)>,
    dir: PathBuf,
    env_file: Option<PathBuf>,
}

impl Leftovers {
    /// Removes every one of them; a failure is logged and the rest still removed.
    async fn remove(&self) {
        match self.drop_databases().await {
            Ok(()) => tracing::info!(prefix = %self.prefix, "throwaway databases dropped"),
            Err(e) => {
                tracing::error!(prefix = %self.prefix, error = %format!("{e:#}"), "could not drop the throwaway databases")
            }
        }
        if let Some((api, vhost)) = &self.vhost {
            match delete_vhost(api, vhost).await {
                Ok(()) => tracing::info!(%vhost, "throwaway vhost deleted"),
                Err(e) => tracing::error!(%vhost, error = %format!("{e:#}"), "could not delete the throwaway vhost"),
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(file) = &self.env_file {
            let _ = std::fs::remove_file(file);
        }
    }

    async fn drop_databases(&self) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.server_url)
            .await
            .with_context(|| format!("connecting to {}", runtime::db::redact(&self.server_url)))?;
        for service in Service::WITH_DATABASE {
            let name = format!("{}{}", self.prefix, service.name());
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("dropping {name}"))?;
        }
        conn.close().await?;
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 40 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `amqp_url` with its vhost replaced by `vhost` (one path segment).
pub fn with_vhost(amqp_url: &str, vhost: &str) -> String {
    let (scheme, rest) = amqp_url.split_once("://").unwrap_or(("amqp", amqp_url));
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail.find(['?', '#']).map(|i| &tail[i..]).unwrap_or("");
    format!("{scheme}://{authority}/{}{query}", percent_encode(vhost))
}

/// The user of an AMQP URL (`guest` when it names none).
fn amqp_user(amqp_url: &str) -> String {
    reqwest::Url::parse(amqp_url)
        .ok()
        .map(|u| u.username().to_owned())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "guest".into())
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build()?)
}

async fn create_vhost(api: &str, vhost: &str, user: &str) -> anyhow::Result<()> {
    let http = http()?;
    let v = percent_encode(vhost);
    management_request(&http, reqwest::Method::PUT, api, &format!("vhosts/{v}"))?
        .send()
        .await
        .context("RabbitMQ management API")?
        .error_for_status()
        .with_context(|| format!("creating vhost {vhost}"))?;
    management_request(&http, reqwest::Method::PUT, api, &format!("permissions/{v}/{}", percent_encode(user)))?
        .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .context("RabbitMQ management API")?
        .error_for_status()
        .with_context(|| format!("granting {user} vhost {vhost}"))?;
    Ok(())
}

async fn delete_vhost(api: &str, vhost: &str) -> anyhow::Result<()> {
    let response =
        management_request(&http()?, reqwest::Method::DELETE, api, &format!("vhosts/{}", percent_encode(vhost)))?
            .send()
            .await
            .context("RabbitMQ management API")?;
    if response.status() != reqwest::StatusCode::NOT_FOUND {
        response.error_for_status().with_context(|| format!("deleting vhost {vhost}"))?;
    }
    Ok(())
}

/// The shell assignments of `--env-file`.
fn env_lines(system: &System, config: &SystemConfig, vhost: &str, dir: &std::path::Path) -> String {
    let mut lines = vec![];
    for service in Service::ALL.into_iter().filter(|s| config.runs(*s)) {
        let upper = service.name().to_uppercase();
        lines.push(format!("{upper}_URL={}", system.wiring.url(service)));
        lines.push(format!("{upper}_PORT={}", system.wiring.addr(service).port()));
    }
    lines.push(format!("DATABASE_PREFIX={}", config.database_prefix));
    lines.push(format!("AMQP_VHOST={vhost}"));
    lines.push(format!("MAIL_DIR={}", dir.join("mail").display()));
    lines.push(format!("SYSTEM_PID={}", std::process::id()));
    lines.join("\n") + "\n"
}

/// Runs a throwaway system until `shutdown`, then removes what it created.
pub async fn run(mut config: SystemConfig, args: ThrowawayArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let name = args.name.clone().unwrap_or_else(|| format!("throwaway{}", std::process::id()));
    anyhow::ensure!(valid_name(&name), "--name {name:?}: letters, digits and _ only, at most 40");
    config.database_prefix = format!("{name}_");
    if config.throttles.is_none() {
        config.throttles = Some(Throttles::Off);
    }
    config.gateway_https_addr.clear();
    config.push_tls_addr.clear();
    let dir = std::env::temp_dir().join(format!("order-system-{name}"));
    config.mail.mail_dir = dir.join("mail");
    let vhost = if args.shared_vhost {
        crate::audit::vhost_of(&config.messaging.amqp_url)
    } else {
        config.messaging.amqp_url = with_vhost(&config.messaging.amqp_url, &name);
        name.clone()
    };
    let leftovers = Leftovers {
        server_url: config.server_url(),
        prefix: config.database_prefix.clone(),
        vhost: (!args.shared_vhost).then(|| (args.rabbitmq_api.clone(), vhost.clone())),
        dir: dir.clone(),
        env_file: args.env_file.clone(),
    };
    let outcome = run_until_shutdown(&config, &args, &leftovers, &vhost, shutdown).await;
    leftovers.remove().await;
    outcome
}

async fn run_until_shutdown(
    config: &SystemConfig,
    args: &ThrowawayArgs,
    leftovers: &Leftovers,
    vhost: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some((api, vhost)) = &leftovers.vhost {
        create_vhost(api, vhost, &amqp_user(&config.messaging.amqp_url)).await?;
    }
    std::fs::create_dir_all(&leftovers.dir)?;
    let listeners = Listeners::free_ports(config, IpAddr::V4(Ipv4Addr::LOCALHOST)).await?;
    let system = System::start(config, listeners, shutdown).await?;
    let env = env_lines(&system, config, vhost, &leftovers.dir);
    if let Some(file) = &args.env_file {
        let partial = file.with_extension("partial");
        std::fs::write(&partial, &env).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, file).with_context(|| format!("writing {}", file.display()))?;
    }
    tracing::info!(
        gateway = %system.wiring.url(Service::Gateway),
        prefix = %config.database_prefix,
        %vhost,
        "throwaway order system running; Ctrl-C stops it and removes its databases and vhost"
    );
    print!("{env}");
    system.join().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_of_a_url_is_replaced_and_the_rest_kept() {
        assert_eq!(with_vhost("amqp://u:p@h:5672/%2f", "t1"), "amqp://u:p@h:5672/t1");
        assert_eq!(with_vhost("amqp://h:5672", "t1"), "amqp://h:5672/t1");
        assert_eq!(with_vhost("amqps://h/old?heartbeat=5", "a_b"), "amqps://h/a_b?heartbeat=5");
        assert_eq!(crate::audit::vhost_of(&with_vhost("amqp://h/x", "t1")), "t1");
    }

    #[test]
    fn a_name_is_safe_in_sql_and_urls() {
        assert!(valid_name("benchflow123_x"));
        for bad in ["", "a\"b", "a b", "a/b", "a-b", &"x".repeat(41)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    /// The databases on the server whose names start with `prefix`.
    async fn databases(config: &SystemConfig, prefix: &str) -> Vec<String> {
        let pool = sqlx::PgPool::connect(&config.server_url()).await.expect("PostgreSQL");
        let names = sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)")
            .bind(prefix)
            .fetch_all(&pool)
            .await
            .expect("pg_database");
        pool.close().await;
        names
    }

    async fn vhost_exists(api: &str, vhost: &str) -> bool {
        let status = management_request(&http().unwrap(), reqwest::Method::GET, api, &format!("vhosts/{vhost}"))
            .unwrap()
            .send()
            .await
            .expect("management API")
            .status();
        assert!(status.is_success() || status == reqwest::StatusCode::NOT_FOUND, "{status}");
        status.is_success()
    }

    fn args(name: &str, env_file: Option<PathBuf>) -> ThrowawayArgs {
        ThrowawayArgs {
            throwaway: true,
            name: Some(name.into()),
            env_file,
            shared_vhost: false,
            rabbitmq_api: std::env::var("RABBITMQ_API_URL")
                .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672/api".into()),
        }
    }

    #[tokio::test]
    async fn a_throwaway_system_removes_its_databases_vhost_and_files_when_stopped() {
        let name = format!("twtest{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let env_file = std::env::temp_dir().join(format!("{name}.env"));
        let config = SystemConfig::from_env();
        let args = args(&name, Some(env_file.clone()));
        let api = args.rabbitmq_api.clone();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(run(config.clone(), args, shutdown.clone()));

        // Eventually: the env file, every service ready, every database. A
        // failure here still stops the system below, so that it removes
        // what it created before the test fails.
        let running_check = async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
            let until = |what: &str| match std::time::Instant::now() < deadline {
                true => Ok(()),
                false => Err(format!("no {what} within 180 s")),
            };
            let vars: std::collections::HashMap<String, String> = loop {
                if let Ok(text) = std::fs::read_to_string(&env_file) {
                    break text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
                }
                if running.is_finished() {
                    return Err("the throwaway system ended at start".to_string());
                }
                until("env file")?;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            // Every service ready (started, migrated, connected), so that the
            // stop below is a stop of a running system.
            for (key, url) in vars.iter().filter(|(k, _)| k.ends_with("_URL")) {
                let ready = format!("{url}/health/ready");
                while !http().unwrap().get(&ready).send().await.is_ok_and(|r| r.status().is_success()) {
                    until(key)?;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
            let databases_there = databases(&config, &format!("{name}_")).await.len();
            let vhost_there = vhost_exists(&api, &name).await;
            Ok((vars, databases_there, vhost_there))
        }
        .await;
        shutdown.cancel();
        let stopped = running.await.expect("task");

        assert_eq!(databases(&config, &format!("{name}_")).await, Vec::<String>::new());
        assert!(!vhost_exists(&api, &name).await, "vhost {name} left");
        assert!(!env_file.exists(), "env file left");
        assert!(!std::env::temp_dir().join(format!("order-system-{name}")).exists(), "mail directory left");
        let (vars, databases_there, vhost_there) = running_check.expect("a running throwaway system");
        assert_eq!(vars["DATABASE_PREFIX"], format!("{name}_"));
        assert_eq!(vars["AMQP_VHOST"], name);
        assert_eq!(databases_there, 4, "its four databases while it ran");
        assert!(vhost_there, "its vhost while it ran");
        stopped.expect("a clean stop");
    }

    #[tokio::test]
    async fn a_throwaway_system_that_cannot_start_fails_and_leaves_nothing() {
        let name = format!("twfail{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let env_file = std::env::temp_dir().join(format!("{name}.env"));
        let config = SystemConfig::from_env();
        // No management API there: the vhost cannot be created.
        let args =
            ThrowawayArgs { rabbitmq_api: "http://127.0.0.1:1/api".into(), ..args(&name, Some(env_file.clone())) };
        let error = run(config.clone(), args, CancellationToken::new()).await.expect_err("no vhost, no system");
        assert!(format!("{error:#}").contains("management API"), "{error:#}");
        assert_eq!(databases(&config, &format!("{name}_")).await, Vec::<String>::new());
        assert!(!env_file.exists());
        assert!(!std::env::temp_dir().join(format!("order-system-{name}")).exists());
    }

    #[tokio::test]
    async fn a_bad_name_is_refused_before_anything_is_created() {
        let error =
            run(SystemConfig::from_env(), args("bad name", None), CancellationToken::new()).await.expect_err("refused");
        assert!(error.to_string().contains("letters, digits and _"), "{error}");
    }

    #[test]
    fn the_user_of_the_broker_gets_the_vhost() {
        assert_eq!(amqp_user("amqp://app:secret@h:5672/%2f"), "app");
        assert_eq!(amqp_user("amqp://h:5672/%2f"), "guest");
    }
}
