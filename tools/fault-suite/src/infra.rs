//! What the suite starts: private PostgreSQL and RabbitMQ servers (through
//! `scripts/private-servers`), every service as its own supervised process,
//! and TCP balancers in front of each service's replicas and of the broker
//! nodes (what a cluster's Service objects do).

use anyhow::{Context, bail};
use rand::Rng;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

pub const PG_PORT: u16 = 24432;
/// AMQP ports of the broker nodes (distribution on +100); the first also has
/// the management API on `MGMT_PORT`.
pub const RMQ_PORTS: [u16; 3] = [24672, 24674, 24676];
pub const MGMT_PORT: u16 = 24673;
pub const AMQP_BALANCER: u16 = 24479;

/// The private servers; removed (stopped, data deleted) on drop.
pub struct Servers {
    pub script: PathBuf,
    pub dir: PathBuf,
    pub nodes: usize,
}

impl Servers {
    pub fn pg_dir(&self) -> PathBuf {
        self.dir.join("postgres")
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("rabbit{i}"))
    }

    pub fn node_name(i: usize) -> String {
        format!("faults{i}")
    }

    pub fn postgres_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{PG_PORT}")
    }

    pub fn management_api(&self) -> String {
        format!("http://guest:guest@127.0.0.1:{MGMT_PORT}/api")
    }

    pub async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.script).args(args).output().await.context("scripts/private-servers")?;
        if !out.status.success() {
            bail!("private-servers {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub async fn start_postgres(&self) -> anyhow::Result<()> {
        self.run(&["postgres", "start", &path(&self.pg_dir()), &PG_PORT.to_string()]).await.map(drop)
    }

    pub async fn stop_postgres(&self) -> anyhow::Result<()> {
        self.run(&["postgres", "stop", &path(&self.pg_dir())]).await.map(drop)
    }

    pub async fn start_node(&self, i: usize) -> anyhow::Result<()> {
        let mgmt = if i == 0 { MGMT_PORT.to_string() } else { String::new() };
        let mut args = vec![
            "rabbitmq".to_string(),
            "start".into(),
            path(&self.node_dir(i)),
            Self::node_name(i),
            RMQ_PORTS[i].to_string(),
        ];
        if !mgmt.is_empty() {
            args.push(mgmt);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args).await.map(drop)
    }

    pub async fn stop_node(&self, i: usize) -> anyhow::Result<()> {
        self.run(&["rabbitmq", "stop", &Self::node_name(i)]).await.map(drop)
    }

    pub async fn kill_node(&self, i: usize) -> anyhow::Result<()> {
        self.run(&["rabbitmq", "kill", &path(&self.node_dir(i))]).await.map(drop)
    }

    pub async fn join(&self, i: usize) -> anyhow::Result<()> {
        self.run(&["rabbitmq", "join", &Self::node_name(i), &Self::node_name(0)]).await.map(drop)
    }

    /// Stops and deletes everything (blocking: also runs from `Drop`).
    pub fn remove(&self) {
        let run = |args: &[&str]| {
            let _ = std::process::Command::new(&self.script).args(args).status();
        };
        for i in (0..self.nodes).rev() {
            run(&["rabbitmq", "remove", &path(&self.node_dir(i)), &Self::node_name(i)]);
        }
        run(&["postgres", "remove", &path(&self.pg_dir())]);
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.remove();
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// One process of one service, restarted whenever it ends (as a cluster
/// would); `kill` SIGKILLs it and brings it back after a pause.
pub struct Replica {
    pub label: String,
    pub service: &'static str,
    pub addr: SocketAddr,
    program: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    kill: Notify,
    pub kills: AtomicU32,
    pub crashes: AtomicU32,
    pub starts: AtomicU32,
    /// How long the last SIGTERM took to end it (None: it had to be killed).
    pub shutdown: Mutex<Option<Option<Duration>>>,
}

impl Replica {
    pub fn new(
        label: String,
        service: &'static str,
        addr: SocketAddr,
        program: PathBuf,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Arc<Replica> {
        Arc::new(Replica {
            label,
            service,
            addr,
            program,
            env,
            log,
            kill: Notify::new(),
            kills: AtomicU32::new(0),
            crashes: AtomicU32::new(0),
            starts: AtomicU32::new(0),
            shutdown: Mutex::new(None),
        })
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        self.starts.fetch_add(1, Ordering::Relaxed);
        Ok(Command::new(&self.program)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn kill(&self) {
        self.kill.notify_one();
    }

    /// Keeps the process running until `stop`, then SIGTERMs it and waits
    /// up to `grace` before killing it.
    pub async fn supervise(self: Arc<Self>, stop: CancellationToken, grace: Duration) {
        loop {
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fault-suite: cannot start {}: {e}", self.label);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            tokio::select! {
                status = child.wait() => {
                    if stop.is_cancelled() { return; }
                    self.crashes.fetch_add(1, Ordering::Relaxed);
                    eprintln!("fault-suite: {} exited by itself ({:?}); restarting", self.label, status.ok());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                _ = self.kill.notified() => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    self.kills.fetch_add(1, Ordering::Relaxed);
                    let down = Duration::from_millis(rand::thread_rng().gen_range(1000..5000));
                    tokio::time::sleep(down).await;
                }
                _ = stop.cancelled() => {
                    let started = Instant::now();
                    if let Some(pid) = child.id() {
                        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
                    }
                    let ended = tokio::time::timeout(grace, child.wait()).await.is_ok();
                    if !ended {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                    *self.shutdown.lock().await = Some(ended.then(|| started.elapsed()));
                    return;
                }
            }
        }
    }
}

/// A TCP balancer: each connection goes to the next backend that accepts it.
pub struct Balancer {
    pub addr: SocketAddr,
    backends: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Balancer {
    pub async fn start(addr: SocketAddr, backends: Vec<SocketAddr>, stop: CancellationToken) -> anyhow::Result<()> {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("balancer on {addr}"))?;
        let lb = Arc::new(Balancer { addr, backends, next: AtomicUsize::new(0) });
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(c) => c, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                let lb = lb.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let n = lb.backends.len();
                    let first = lb.next.fetch_add(1, Ordering::Relaxed);
                    for i in 0..n {
                        let backend = lb.backends[(first + i) % n];
                        if let Ok(Ok(mut upstream)) =
                            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(backend)).await
                        {
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                                _ = stop.cancelled() => {}
                            }
                            return;
                        }
                    }
                    let _ = lb.addr;
                });
            }
        });
        Ok(())
    }
}

/// Waits until `url` answers 2xx (or the deadline passes).
pub async fn wait_ready(http: &reqwest::Client, url: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} not ready within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
