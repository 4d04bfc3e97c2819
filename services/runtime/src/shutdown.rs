//! Graceful shutdown: one `CancellationToken` per process, cancelled by
//! SIGINT or SIGTERM and passed to every long-running task; `Tasks` runs a
//! service's tasks and stops them all when one of them fails.

use std::collections::HashMap;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// How long the tasks of a process get to stop after shutdown was asked
/// (their drain windows, e.g. the gateway's 5 s for event streams, fit in it).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(15);

/// The long-running tasks of one service.
pub struct Tasks {
    set: JoinSet<(&'static str, anyhow::Result<()>)>,
    names: HashMap<tokio::task::Id, &'static str>,
    shutdown: CancellationToken,
    grace: Duration,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken) -> Self {
        Tasks { set: JoinSet::new(), names: HashMap::new(), shutdown, grace: DEFAULT_GRACE }
    }

    /// How long the tasks get to stop once shutdown is asked; then those still
    /// running are abandoned (and logged).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.set.spawn(async move { (name, task.await) });
        self.names.insert(handle.id(), name);
    }

    /// Waits for every task. The first failure cancels the others and is
    /// returned. Once shutdown is asked, the tasks get the grace period to
    /// end; a task still running then is abandoned and logged, so that
    /// shutdown always ends, whatever state the dependencies are in.
    pub async fn join(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        let mut deadline = None;
        loop {
            if deadline.is_none() && self.shutdown.is_cancelled() {
                deadline = Some(tokio::time::Instant::now() + self.grace);
            }
            let joined = match deadline {
                None => tokio::select! {
                    joined = self.set.join_next_with_id() => joined,
                    _ = self.shutdown.cancelled() => continue,
                },
                Some(deadline) => match tokio::time::timeout_at(deadline, self.set.join_next_with_id()).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        for name in self.names.values() {
                            tracing::error!(task = name, grace = ?self.grace, "task did not stop in time; abandoned");
                        }
                        self.set.abort_all();
                        self.set.detach_all();
                        break;
                    }
                },
            };
            let Some(joined) = joined else { break };
            let (name, result) = match joined {
                Ok((id, r)) => {
                    self.names.remove(&id);
                    r
                }
                Err(e) => {
                    let name = self.names.remove(&e.id()).unwrap_or("task");
                    (name, Err(anyhow::anyhow!("panicked: {e}")))
                }
            };
            match result {
                Ok(()) if self.shutdown.is_cancelled() => {}
                Ok(()) => tracing::warn!(task = name, "task ended before shutdown"),
                Err(e) => {
                    tracing::error!(task = name, error = ?e, "task failed; stopping the service");
                    self.shutdown.cancel();
                    first_error.get_or_insert(e.context(name));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
