//! Replay slots: reading the stream to resume a connection costs a channel
//! and a reader on the broker, so replays are bounded in all
//! (`PUSH_MAX_REPLAYS`) and per user (`PUSH_MAX_REPLAYS_PER_USER`). A resume
//! that cannot get a slot within `PUSH_REPLAY_WAIT_MS` is answered 503 with
//! `Retry-After` instead of waiting without end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

pub struct ReplaySlots {
    all: Arc<Semaphore>,
    per_user: Mutex<HashMap<Uuid, usize>>,
    max_per_user: usize,
    wait: Duration,
}

/// A replay's slot, held until the replay ends.
pub struct ReplaySlot {
    _permit: OwnedSemaphorePermit,
    slots: Arc<ReplaySlots>,
    user: Uuid,
}

impl ReplaySlots {
    pub fn new(max: usize, max_per_user: usize, wait: Duration) -> Arc<Self> {
        Arc::new(ReplaySlots {
            all: Arc::new(Semaphore::new(max.max(1))),
            per_user: Mutex::new(HashMap::new()),
            max_per_user: max_per_user.max(1),
            wait,
        })
    }

    fn take_users(&self, user: Uuid) -> bool {
        let mut per_user = self.per_user.lock().expect("replays lock");
        let n = per_user.entry(user).or_default();
        if *n < self.max_per_user {
            *n += 1;
            true
        } else {
            false
        }
    }

    fn give_back(&self, user: Uuid) {
        let mut per_user = self.per_user.lock().expect("replays lock");
        if let Some(n) = per_user.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&user);
            }
        }
    }

    /// A slot for `user` within the configured wait, or `None`.
    pub async fn acquire(self: &Arc<Self>, user: Uuid) -> Option<ReplaySlot> {
        let deadline = tokio::time::Instant::now() + self.wait;
        while !self.take_users(user) {
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match tokio::time::timeout_at(deadline, self.all.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Some(ReplaySlot { _permit: permit, slots: self.clone(), user }),
            _ => {
                self.give_back(user);
                None
            }
        }
    }
}

impl Drop for ReplaySlot {
    fn drop(&mut self) {
        self.slots.give_back(self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_user_gets_at_most_their_share_of_slots_within_the_wait() {
        let slots = ReplaySlots::new(3, 2, Duration::from_millis(100));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a1 = slots.acquire(alice).await.expect("first");
        let _a2 = slots.acquire(alice).await.expect("second");
        assert!(slots.acquire(alice).await.is_none(), "a third for alice waits and gives up");
        let b1 = slots.acquire(bob).await.expect("bob is not affected");
        // All three taken: bob's second waits for the total and gives up.
        assert!(slots.acquire(bob).await.is_none());
        drop(a1);
        let _b2 = slots.acquire(bob).await.expect("a slot freed");
        let _a3 = slots.acquire(alice).await;
        assert!(_a3.is_none(), "alice holds one of two, but none is free in all");
        drop(b1);
        let _a3 = slots.acquire(alice).await.expect("alice's second");
        assert!(slots.acquire(alice).await.is_none(), "and no third");
    }

    #[tokio::test]
    async fn a_slot_freed_during_the_wait_is_taken() {
        let slots = ReplaySlots::new(1, 1, Duration::from_secs(5));
        let user = Uuid::new_v4();
        let first = slots.acquire(user).await.unwrap();
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(user).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        assert!(waiter.await.unwrap());
        assert!(slots.per_user.lock().unwrap().is_empty());
    }
}
