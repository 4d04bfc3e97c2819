//! What one user did and saw, and what must hold at the end: every accepted
//! order reached a final state; its outcome arrived on the user's event
//! stream exactly once (and agrees with what polling saw); event ids only
//! grow; the account's balance is the deposits less the prices of the orders
//! that succeeded. Amounts are in cents.

use std::collections::HashMap;
use std::fmt;
use uuid::Uuid;

/// A final order status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
}

impl Outcome {
    /// The final status named by the API (`succeeded`, `failed`); `None`
    /// for `pending` or anything else.
    pub fn parse(status: &str) -> Option<Outcome> {
        match status {
            "succeeded" => Some(Outcome::Succeeded),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

/// A money amount as the API writes it (a JSON number such as `12.5`) in cents.
pub fn cents(amount: &serde_json::Value) -> Option<i64> {
    let v = match amount {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    Some((v * 100.0).round() as i64)
}

#[derive(Debug)]
struct Placed {
    price: i64,
    stream: Option<Outcome>,
    stream_events: u32,
    poll: Option<Outcome>,
}

/// Something that does not add up.
#[derive(Clone, Debug, PartialEq)]
pub enum Problem {
    /// Accepted (202) but no final state seen, on the stream or by polling.
    NotFinal(Uuid),
    /// Final by polling, but its event never came on the stream.
    MissedOnStream(Uuid),
    /// The order's event came more than once.
    Doubled(Uuid, u32),
    /// The stream and the poll disagree about the outcome.
    Disagree(Uuid),
    /// An event for an order this user never had accepted.
    Unexpected(Uuid),
    /// An event id not greater than the one before it on the stream.
    IdNotIncreasing { previous: u64, id: u64 },
    /// The stream said its history was gone (`reset`).
    Reset,
    /// The account's balance is not deposits − successful prices.
    Balance { expected: i64, actual: i64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotFinal(id) => write!(f, "order {id} accepted but never final"),
            Problem::MissedOnStream(id) => write!(f, "order {id} settled but its event never came on the stream"),
            Problem::Doubled(id, n) => write!(f, "order {id}: its event came {n} times"),
            Problem::Disagree(id) => write!(f, "order {id}: the stream and the poll disagree on the outcome"),
            Problem::Unexpected(id) => write!(f, "an event for order {id}, which this user never placed"),
            Problem::IdNotIncreasing { previous, id } => write!(f, "event id {id} after {previous}"),
            Problem::Reset => write!(f, "the stream sent reset (history lost)"),
            Problem::Balance { expected, actual } => {
                write!(f, "balance {:.2}, expected {:.2}", *actual as f64 / 100.0, *expected as f64 / 100.0)
            }
        }
    }
}

/// What an event on the stream was, for the one who reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// The order's first event: it is complete.
    First,
    /// An event for an order that was complete already.
    Again,
    /// The order's event came before its 202 was read (kept until it is).
    Early,
}

/// One user's bookkeeping.
#[derive(Debug, Default)]
pub struct Ledger {
    deposited: i64,
    orders: HashMap<Uuid, Placed>,
    /// Events for orders whose 202 was not read yet: outcome and how many.
    early: HashMap<Uuid, (Outcome, u32)>,
    last_event_id: Option<u64>,
    stream_problems: Vec<Problem>,
}

impl Ledger {
    pub fn deposited(&mut self, amount: i64) {
        self.deposited += amount;
    }

    /// An order was accepted (202). Returns its outcome if its event came
    /// first.
    pub fn accepted(&mut self, id: Uuid, price: i64) -> Option<Outcome> {
        let mut placed = Placed { price, stream: None, stream_events: 0, poll: None };
        let early = self.early.remove(&id);
        if let Some((outcome, n)) = early {
            placed.stream = Some(outcome);
            placed.stream_events = n;
        }
        self.orders.insert(id, placed);
        early.map(|(o, _)| o)
    }

    /// An order event on the stream, with its `id:` if it had one.
    pub fn stream_event(&mut self, event_id: Option<u64>, order: Uuid, outcome: Outcome) -> Seen {
        if let Some(id) = event_id {
            if let Some(previous) = self.last_event_id
                && id <= previous
            {
                self.stream_problems.push(Problem::IdNotIncreasing { previous, id });
            }
            self.last_event_id = Some(self.last_event_id.map_or(id, |p| p.max(id)));
        }
        match self.orders.get_mut(&order) {
            Some(placed) => {
                placed.stream_events += 1;
                if placed.stream.is_none() {
                    placed.stream = Some(outcome);
                    Seen::First
                } else {
                    Seen::Again
                }
            }
            None => {
                let e = self.early.entry(order).or_insert((outcome, 0));
                e.1 += 1;
                Seen::Early
            }
        }
    }

    /// The stream said its history is gone.
    pub fn reset(&mut self) {
        self.stream_problems.push(Problem::Reset);
    }

    /// The id to resume the stream from.
    pub fn last_event_id(&self) -> Option<u64> {
        self.last_event_id
    }

    /// A poll saw the order final.
    pub fn polled(&mut self, order: Uuid, outcome: Outcome) {
        if let Some(placed) = self.orders.get_mut(&order) {
            placed.poll = Some(outcome);
        }
    }

    /// Whether the order's outcome came on the stream.
    pub fn on_stream(&self, order: Uuid) -> bool {
        self.orders.get(&order).is_some_and(|p| p.stream.is_some())
    }

    /// Accepted orders, and how many of them are known final.
    pub fn counts(&self) -> (usize, usize) {
        let fin = self.orders.values().filter(|p| p.stream.or(p.poll).is_some()).count();
        (self.orders.len(), fin)
    }

    /// Deposits less the prices of the orders that succeeded.
    pub fn expected_balance(&self) -> i64 {
        let spent: i64 =
            self.orders.values().filter(|p| p.stream.or(p.poll) == Some(Outcome::Succeeded)).map(|p| p.price).sum();
        self.deposited - spent
    }

    /// Everything that does not add up, given the balance the account
    /// reported (`None`: not checked).
    pub fn verify(&self, balance: Option<i64>) -> Vec<Problem> {
        let mut problems = self.stream_problems.clone();
        let mut ids: Vec<_> = self.orders.keys().copied().collect();
        ids.sort();
        for id in ids {
            let p = &self.orders[&id];
            match (p.stream, p.poll) {
                (None, None) => problems.push(Problem::NotFinal(id)),
                (None, Some(_)) => problems.push(Problem::MissedOnStream(id)),
                (Some(s), Some(q)) if s != q => problems.push(Problem::Disagree(id)),
                _ => {}
            }
            if p.stream_events > 1 {
                problems.push(Problem::Doubled(id, p.stream_events));
            }
        }
        let mut early: Vec<_> = self.early.keys().copied().collect();
        early.sort();
        problems.extend(early.into_iter().map(Problem::Unexpected));
        if let Some(actual) = balance {
            let expected = self.expected_balance();
            if actual != expected {
                problems.push(Problem::Balance { expected, actual });
            }
        }
        problems
    }
}

#[cfg(test)]
// Cents written as units_cents.
#[allow(clippy::inconsistent_digit_grouping)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn a_clean_run_adds_up() {
        let mut l = Ledger::default();
        l.deposited(100_00);
        assert_eq!(l.accepted(id(1), 30_00), None);
        assert_eq!(l.accepted(id(2), 500_00), None);
        assert_eq!(l.stream_event(Some(7), id(1), Outcome::Succeeded), Seen::First);
        assert_eq!(l.stream_event(Some(9), id(2), Outcome::Failed), Seen::First);
        l.polled(id(2), Outcome::Failed);
        assert_eq!(l.counts(), (2, 2));
        assert_eq!(l.expected_balance(), 70_00);
        assert_eq!(l.verify(Some(70_00)), vec![]);
        assert_eq!(l.last_event_id(), Some(9));
    }

    #[test]
    fn an_order_never_final_is_reported() {
        let mut l = Ledger::default();
        l.accepted(id(1), 1_00);
        assert_eq!(l.verify(None), vec![Problem::NotFinal(id(1))]);
    }

    #[test]
    fn an_event_missing_from_the_stream_is_reported_even_when_polling_saw_it() {
        let mut l = Ledger::default();
        l.accepted(id(1), 1_00);
        l.polled(id(1), Outcome::Succeeded);
        assert_eq!(l.verify(None), vec![Problem::MissedOnStream(id(1))]);
    }

    #[test]
    fn a_doubled_event_is_reported_with_its_repeated_id() {
        let mut l = Ledger::default();
        l.accepted(id(1), 1_00);
        assert_eq!(l.stream_event(Some(3), id(1), Outcome::Succeeded), Seen::First);
        assert_eq!(l.stream_event(Some(3), id(1), Outcome::Succeeded), Seen::Again);
        assert_eq!(l.verify(None), vec![Problem::IdNotIncreasing { previous: 3, id: 3 }, Problem::Doubled(id(1), 2)]);
    }

    #[test]
    fn an_event_before_the_202_counts_once_the_order_is_accepted() {
        let mut l = Ledger::default();
        assert_eq!(l.stream_event(Some(1), id(1), Outcome::Succeeded), Seen::Early);
        assert_eq!(l.verify(None), vec![Problem::Unexpected(id(1))]);
        assert_eq!(l.accepted(id(1), 5_00), Some(Outcome::Succeeded));
        l.deposited(5_00);
        assert_eq!(l.verify(Some(0)), vec![]);
    }

    #[test]
    fn stream_and_poll_must_agree() {
        let mut l = Ledger::default();
        l.accepted(id(1), 1_00);
        l.stream_event(None, id(1), Outcome::Failed);
        l.polled(id(1), Outcome::Succeeded);
        assert_eq!(l.verify(None), vec![Problem::Disagree(id(1))]);
    }

    #[test]
    fn a_wrong_balance_and_a_reset_are_reported() {
        let mut l = Ledger::default();
        l.deposited(10_00);
        l.accepted(id(1), 4_00);
        l.stream_event(Some(1), id(1), Outcome::Succeeded);
        l.reset();
        assert_eq!(l.verify(Some(10_00)), vec![Problem::Reset, Problem::Balance { expected: 6_00, actual: 10_00 }]);
    }

    #[test]
    fn amounts_in_cents() {
        assert_eq!(cents(&serde_json::json!(12.5)), Some(1250));
        assert_eq!(cents(&serde_json::json!(0.07)), Some(7));
        assert_eq!(cents(&serde_json::json!("3.10")), Some(310));
        assert_eq!(cents(&serde_json::json!(null)), None);
        assert_eq!(Outcome::parse("pending"), None);
        assert_eq!(Outcome::parse("failed"), Some(Outcome::Failed));
    }
}
