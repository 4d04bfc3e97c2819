//! Waiting for a row to change, woken by the change itself: a trigger
//! `NOTIFY`s a channel with the row's key when its transaction commits, one
//! `LISTEN` connection per process receives it (whichever replica made the
//! change), and the requests waiting for that key are woken in memory. A
//! waiting request holds no database connection, costs a map entry and a
//! channel, and uses no CPU until woken.

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The waiters of one process, by key.
#[derive(Clone)]
pub struct Watch {
    inner: Arc<Inner>,
}

struct Inner {
    waiters: Mutex<HashMap<String, watch::Sender<()>>>,
    shutdown: CancellationToken,
}

impl Watch {
    /// Waiters of this process; `shutdown` wakes them all for good.
    pub fn new(shutdown: CancellationToken) -> Self {
        Watch { inner: Arc::new(Inner { waiters: Mutex::default(), shutdown }) }
    }

    /// Starts watching `key`. Register before reading the row, so that a
    /// change committed between the read and the wait is not missed.
    pub fn watch(&self, key: impl Into<String>) -> Watcher {
        let key = key.into();
        let mut waiters = self.inner.waiters.lock().expect("not poisoned");
        let rx = waiters.entry(key.clone()).or_insert_with(|| watch::channel(()).0).subscribe();
        Watcher { inner: self.inner.clone(), key, rx }
    }

    /// How many keys are being waited for.
    pub fn keys(&self) -> usize {
        self.inner.waiters.lock().expect("not poisoned").len()
    }

    fn wake(&self, key: &str) {
        if let Some(tx) = self.inner.waiters.lock().expect("not poisoned").get(key) {
            tx.send_replace(());
        }
    }

    /// Wakes every waiter to look again (notifications may have been lost).
    fn wake_all(&self) {
        for tx in self.inner.waiters.lock().expect("not poisoned").values() {
            tx.send_replace(());
        }
    }

    /// Listens on `channel` (whose payloads are keys) until shutdown,
    /// reconnecting when the connection is lost; after a loss every waiter
    /// looks again, since a notification may have been missed meanwhile.
    pub async fn listen(self, db: PgPool, channel: &'static str) -> anyhow::Result<()> {
        let shutdown = self.inner.shutdown.clone();
        let mut listener: Option<PgListener> = None;
        loop {
            let Some(l) = listener.as_mut() else {
                let connect = async {
                    let mut l = PgListener::connect_with(&db).await?;
                    l.listen(channel).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = connect => match r {
                        Ok(l) => {
                            tracing::info!(channel, "listening for changes");
                            listener = Some(l);
                            self.wake_all();
                        }
                        Err(e) => {
                            tracing::warn!(channel, error = %e, "LISTEN failed; waiters answer at their deadline until it works");
                            tokio::select! {
                                _ = shutdown.cancelled() => return Ok(()),
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    },
                }
                continue;
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = l.try_recv() => match n {
                    Ok(Some(n)) => self.wake(n.payload()),
                    // The connection was lost (the next call reconnects).
                    Ok(None) => {
                        tracing::warn!(channel, "listener connection lost; reconnecting");
                        self.wake_all();
                    }
                    Err(e) => {
                        tracing::warn!(channel, error = %e, "listener failed; reconnecting");
                        listener = None;
                        self.wake_all();
                    }
                },
            }
        }
    }
}

/// One waiting request's registration; dropping it unregisters.
pub struct Watcher {
    inner: Arc<Inner>,
    key: String,
    rx: watch::Receiver<()>,
}

impl Watcher {
    /// Waits until the key is notified (or every waiter is asked to look
    /// again) since registration or the previous call: `true`; `false` on
    /// shutdown, at once and from then on.
    pub async fn changed(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.inner.shutdown.cancelled() => false,
            r = self.rx.changed() => r.is_ok(),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut waiters = self.inner.waiters.lock().expect("not poisoned");
        // This receiver is the last one of the key: forget the key.
        if waiters.get(&self.key).is_some_and(|tx| tx.receiver_count() <= 1) {
            waiters.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_after_registration_wakes_and_keys_are_forgotten() {
        let shutdown = CancellationToken::new();
        let watch = Watch::new(shutdown.clone());
        let mut a = watch.watch("k");
        let b = watch.watch("k");
        let _other = watch.watch("j");
        assert_eq!(watch.keys(), 2);
        // Notified before it waits: not lost.
        watch.wake("k");
        assert!(tokio::time::timeout(Duration::from_secs(1), a.changed()).await.unwrap());
        // Nothing new: it waits.
        assert!(tokio::time::timeout(Duration::from_millis(50), a.changed()).await.is_err());
        drop(b);
        assert_eq!(watch.keys(), 2, "a still waits for k");
        drop(a);
        assert_eq!(watch.keys(), 1);
        let mut c = watch.watch("j");
        shutdown.cancel();
        assert!(!c.changed().await, "shutdown ends the wait");
    }
}
