//! Replay slots: reading the stream to resume a connection costs a channel
//! and a reader on the broker, so replays are bounded in all
//! (`PUSH_MAX_REPLAYS`) and per user (`PUSH_MAX_REPLAYS_PER_USER`). A resume
//! that cannot get a slot within `PUSH_REPLAY_WAIT_MS` is answered 503 with
//! `Retry-After` instead of waiting without end.
//!
//! Slots are shared fairly (max-min): a freed slot goes to the waiting user
//! who holds the fewest, the longest-waiting of them on a tie. So a user
//! with many resumes queued does not keep others waiting behind them, a
//! user who holds none is served before those who hold some, and under
//! contention every user ends up with an equal share.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use uuid::Uuid;

pub struct ReplaySlots {
    state: Mutex<State>,
    max_per_user: usize,
    wait: Duration,
}

struct State {
    free: usize,
    held: HashMap<Uuid, usize>,
    /// Each user's resumes waiting for a slot, in the order they came.
    waiting: HashMap<Uuid, VecDeque<Waiter>>,
    next_ticket: u64,
}

struct Waiter {
    ticket: u64,
    grant: oneshot::Sender<()>,
}

/// A replay's slot, held until the replay ends.
pub struct ReplaySlot {
    slots: Arc<ReplaySlots>,
    user: Uuid,
}

/// A resume waiting for its slot; dropped (timed out, or its connection
/// gone), it leaves the queue, or gives back a slot granted meanwhile.
struct Pending {
    slots: Arc<ReplaySlots>,
    user: Uuid,
    ticket: u64,
    granted: Option<oneshot::Receiver<()>>,
}

impl ReplaySlots {
    pub fn new(max: usize, max_per_user: usize, wait: Duration) -> Arc<Self> {
        Arc::new(ReplaySlots {
            state: Mutex::new(State {
                free: max.max(1),
                held: HashMap::new(),
                waiting: HashMap::new(),
                next_ticket: 0,
            }),
            max_per_user: max_per_user.max(1),
            wait,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("replays lock")
    }

    /// Hands free slots to waiters: each to the user below their cap who
    /// holds the fewest, the one waiting longest on a tie.
    fn dispatch(&self, state: &mut State) {
        while state.free > 0 {
            let State { held, waiting, .. } = &*state;
            let next = waiting
                .iter()
                .filter_map(|(user, queue)| {
                    let holds = held.get(user).copied().unwrap_or(0);
                    let first = queue.front()?;
                    (holds < self.max_per_user).then_some((holds, first.ticket, *user))
                })
                .min();
            let Some((_, _, user)) = next else { return };
            let queue = state.waiting.get_mut(&user).expect("chosen from the map");
            let waiter = queue.pop_front().expect("not empty");
            if queue.is_empty() {
                state.waiting.remove(&user);
            }
            // A waiter leaves the queue before its receiver goes, under the
            // lock: a send fails only if it never waited.
            if waiter.grant.send(()).is_ok() {
                state.free -= 1;
                *state.held.entry(user).or_default() += 1;
            }
        }
    }

    fn give_back(&self, user: Uuid) {
        let mut state = self.lock();
        if let Some(n) = state.held.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                state.held.remove(&user);
            }
        }
        state.free += 1;
        self.dispatch(&mut state);
    }

    /// A slot for `user` within the configured wait, or `None`.
    pub async fn acquire(self: &Arc<Self>, user: Uuid) -> Option<ReplaySlot> {
        let (grant, granted) = oneshot::channel();
        let ticket = {
            let mut state = self.lock();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waiting.entry(user).or_default().push_back(Waiter { ticket, grant });
            self.dispatch(&mut state);
            ticket
        };
        let mut pending = Pending { slots: self.clone(), user, ticket, granted: Some(granted) };
        let receiver = pending.granted.as_mut().expect("set above");
        match tokio::time::timeout(self.wait, receiver).await {
            Ok(Ok(())) => {
                pending.granted = None;
                Some(ReplaySlot { slots: self.clone(), user })
            }
            _ => None,
        }
    }

    /// Resumes waiting for a slot, of every user.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().waiting.values().map(VecDeque::len).sum()
    }

    /// Slots `user` holds.
    #[cfg(test)]
    fn held_by(&self, user: Uuid) -> usize {
        self.lock().held.get(&user).copied().unwrap_or(0)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(mut granted) = self.granted.take() else { return };
        let mut state = self.slots.lock();
        if granted.try_recv().is_ok() {
            // Granted as it gave up: the slot goes to the next waiter.
            drop(state);
            self.slots.give_back(self.user);
            return;
        }
        if let Some(queue) = state.waiting.get_mut(&self.user) {
            queue.retain(|w| w.ticket != self.ticket);
            if queue.is_empty() {
                state.waiting.remove(&self.user);
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

    /// Lets spawned acquirers run until `n` resumes wait.
    async fn until_waiting(slots: &ReplaySlots, n: usize) {
        while slots.waiting() != n {
            tokio::task::yield_now().await;
        }
    }

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
        assert_eq!(slots.waiting(), 0, "who gave up left the queue");
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
        until_waiting(&slots, 1).await;
        drop(first);
        assert!(waiter.await.unwrap());
        assert_eq!(slots.held_by(user), 0);
        assert_eq!(slots.lock().free, 1);
    }

    #[tokio::test]
    async fn a_user_with_resumes_queued_does_not_keep_another_waiting_behind_them() {
        let slots = ReplaySlots::new(2, 2, Duration::from_secs(30));
        let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let c1 = slots.acquire(carol).await.unwrap();
        let c2 = slots.acquire(carol).await.unwrap();
        // Alice queues two resumes, then bob one.
        let mut waiters = Vec::new();
        for (user, n) in [(alice, 1), (alice, 2), (bob, 3)] {
            let s = slots.clone();
            waiters.push(tokio::spawn(async move { s.acquire(user).await }));
            until_waiting(&slots, n).await;
        }
        drop(c1);
        assert_eq!((slots.held_by(alice), slots.held_by(bob)), (1, 0), "the first freed slot: the longest waiting");
        drop(c2);
        assert_eq!(
            (slots.held_by(alice), slots.held_by(bob)),
            (1, 1),
            "the next: bob, who holds none, before alice's second"
        );
        assert_eq!(slots.waiting(), 1);
        let b1 = waiters.pop().unwrap().await.unwrap().expect("bob's");
        let a1 = waiters.remove(0).await.unwrap().expect("alice's first");
        drop((a1, b1));
        let a2 = waiters.pop().unwrap().await.unwrap().expect("alice's second, once the others are done");
        assert_eq!(slots.held_by(alice), 1);
        drop(a2);
    }

    #[tokio::test]
    async fn a_resume_that_gives_up_leaves_the_queue_and_no_slot_is_lost() {
        let slots = ReplaySlots::new(1, 1, Duration::from_secs(30));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = slots.acquire(alice).await.unwrap();
        let gone = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(bob).await }
        });
        until_waiting(&slots, 1).await;
        gone.abort(); // the browser went away while waiting
        let _ = gone.await;
        assert_eq!(slots.waiting(), 0);
        drop(a);
        assert_eq!(slots.lock().free, 1);
        assert!(slots.acquire(bob).await.is_some());
    }
}
