//! A throwaway order system for a benchmark: the `order-system` binary run as
//! `order-system run --throwaway` (free ports, databases `<name>_*`, its own
//! RabbitMQ vhost, throttles off), which removes its databases and vhost
//! itself when it stops. Shared by the benchmarks of several crates (each
//! includes this file with `#[path]`, as `proc.rs`); scripts use
//! `throwaway_start` of scripts/lib.sh instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Throwaway {
    child: tokio::process::Child,
    env_file: PathBuf,
    /// What the system wrote to its env file: GATEWAY_URL, ORDERING_URL,
    /// DATABASE_PREFIX, AMQP_VHOST, ...
    pub vars: HashMap<String, String>,
}

impl Throwaway {
    /// Starts `binary` as a throwaway system named `name` with `env` on top of
    /// this process's environment, and waits until it has bound its
    /// listeners (not until it is ready: see `wait_ready`).
    pub async fn start(binary: &Path, name: &str, env: &[(&str, String)]) -> anyhow::Result<Throwaway> {
        let env_file = std::env::temp_dir().join(format!("throwaway-{name}.env"));
        let _ = std::fs::remove_file(&env_file);
        let mut child = tokio::process::Command::new(binary)
            .args(["run", "--throwaway", "--name", name, "--env-file"])
            .arg(&env_file)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&env_file) {
                break text;
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the throwaway order system {name} ended at start: {status}");
            }
            anyhow::ensure!(Instant::now() < deadline, "the throwaway order system {name} did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let vars = text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        Ok(Throwaway { child, env_file, vars })
    }

    /// A variable of its env file (e.g. `GATEWAY_URL`).
    pub fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or_else(|| panic!("the throwaway system wrote no {name}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Waits until every service it runs answers its readiness check.
    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
        let urls: Vec<String> = self
            .vars
            .iter()
            .filter(|(k, _)| k.ends_with("_URL"))
            .map(|(_, url)| format!("{url}/health/ready"))
            .collect();
        let deadline = Instant::now() + limit;
        for url in urls {
            while !http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                anyhow::ensure!(Instant::now() < deadline, "{url} did not become ready");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Stops it with SIGTERM (it then removes its databases and vhost) and
    /// waits up to 60 s; then kills it, and says what it may have left.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = self.child.kill().await;
                eprintln!(
                    "the throwaway order system did not stop within 60 s: its databases {}* and vhost {} may be left",
                    self.vars.get("DATABASE_PREFIX").map(String::as_str).unwrap_or("?"),
                    self.vars.get("AMQP_VHOST").map(String::as_str).unwrap_or("?"),
                );
            }
        }
        let _ = std::fs::remove_file(&self.env_file);
    }
}
