//! Graceful shutdown: one `CancellationToken` per process, cancelled by
//! SIGINT or SIGTERM and passed to every long-running task; `Tasks` runs a
//! service's tasks and stops them all when one of them fails.

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

/// The long-running tasks of one service.
pub struct Tasks {
    set: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown: CancellationToken,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken) -> Self {
        Tasks { set: JoinSet::new(), shutdown }
    }

    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.set.spawn(async move { (name, task.await) });
    }

    /// Waits for every task. The first failure cancels the others and is returned.
    pub async fn join(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(joined) = self.set.join_next().await {
            let (name, result) = match joined {
                Ok(r) => r,
                Err(e) => ("task", Err(anyhow::anyhow!("panicked: {e}"))),
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
