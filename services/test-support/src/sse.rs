//! An incremental parser of `text/event-stream` (the subset the push service
//! sends: `id:`, `event:`, `data:`, `retry:`, comments), and a response read
//! into events as they arrive.

use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;

/// One dispatched event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `id:` field of this event, if it had one.
    pub id: Option<String>,
    /// `event:`, or `message` when absent.
    pub event: String,
    pub data: String,
}

impl Event {
    /// The event's id, or "" when it had none.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }
}

#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    last_event_id: Option<String>,
    retry: Option<Duration>,
}

impl Parser {
    /// Feeds bytes as they arrive; returns the events completed by them.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(n) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.buf[start..start + n];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            start += n + 1;
            self.line(&line, &mut events);
        }
        self.buf.drain(..start);
        events
    }

    /// What a browser would send as `Last-Event-ID` now: the last `id:` of a
    /// completed frame, with or without data (a frame of an id alone sets it
    /// without firing an event).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The reconnection delay the server last asked for (`retry:`).
    pub fn retry(&self) -> Option<Duration> {
        self.retry
    }

    fn line(&mut self, line: &str, events: &mut Vec<Event>) {
        if line.is_empty() {
            if let Some(id) = &self.id {
                self.last_event_id = Some(id.clone());
            }
            if let Some(data) = self.data.take() {
                events.push(Event {
                    id: self.id.take(),
                    event: self.event.take().unwrap_or_else(|| "message".into()),
                    data,
                });
            }
            self.id = None;
            self.event = None;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            "retry" => {
                if let Ok(ms) = value.parse() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
    }
}

/// Reads an event stream response (asserted to be one: 200,
/// `text/event-stream`) into events on the receiver, which closes when the
/// stream ends.
pub fn events(resp: reqwest::Response) -> mpsc::UnboundedReceiver<Event> {
    assert_eq!(resp.status(), reqwest::StatusCode::OK, "an event stream");
    let kind = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(kind.starts_with("text/event-stream"), "an event stream, not {kind:?}");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        let mut parser = Parser::default();
        while let Some(Ok(chunk)) = body.next().await {
            for event in parser.push(&chunk) {
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_line_endings() {
        let mut p = Parser::default();
        assert_eq!(p.push(b"retry: 3000\n\n: heartbeat\n\nid: 17\r\nevent: Order"), vec![]);
        assert_eq!(p.retry(), Some(Duration::from_secs(3)));
        let events = p.push(b"Created\ndata: {\"a\":1}\n\nid: 18\nevent: reset\ndata: x\ndata: y\n\n");
        assert_eq!(
            events,
            vec![
                Event { id: Some("17".into()), event: "OrderCreated".into(), data: "{\"a\":1}".into() },
                Event { id: Some("18".into()), event: "reset".into(), data: "x\ny".into() },
            ]
        );
        assert_eq!(p.last_event_id(), Some("18"));
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_fields_do_not_leak() {
        let mut p = Parser::default();
        assert_eq!(
            p.push(b"id: 1\nevent: OrderCreated\n\ndata: z\n\n"),
            vec![Event { id: None, event: "message".into(), data: "z".into() }]
        );
    }

    #[test]
    fn a_frame_of_an_id_alone_sets_the_last_event_id() {
        let mut p = Parser::default();
        assert_eq!(p.push(b"id: 41\r\n\r\n"), vec![]);
        assert_eq!(p.last_event_id(), Some("41"));
        // An incomplete frame does not count yet.
        p.push(b"id: 42\n");
        assert_eq!(p.last_event_id(), Some("41"));
        let events = p.push(b"data: x\n\n");
        assert_eq!(events[0].id(), "42");
        assert_eq!(p.last_event_id(), Some("42"));
        // A bad retry value is ignored.
        p.push(b"retry: soon\n\n");
        assert_eq!(p.retry(), None);
    }
}
