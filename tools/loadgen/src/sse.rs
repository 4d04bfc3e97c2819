//! An incremental parser of `text/event-stream` (the subset the push
//! service sends: `id:`, `event:`, `data:`, `retry:`, comments).

/// One dispatched event.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    /// The `id:` field of this event, if it had one.
    pub id: Option<String>,
    /// `event:`, or `message` when absent.
    pub event: String,
    pub data: String,
}

#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
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

    fn line(&mut self, line: &str, events: &mut Vec<Event>) {
        if line.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_line_endings() {
        let mut p = Parser::default();
        assert_eq!(p.push(b"retry: 3000\n\n: heartbeat\n\nid: 17\r\nevent: Order"), vec![]);
        let events = p.push(b"Created\ndata: {\"a\":1}\n\nid: 18\nevent: reset\ndata: x\ndata: y\n\n");
        assert_eq!(
            events,
            vec![
                Event { id: Some("17".into()), event: "OrderCreated".into(), data: "{\"a\":1}".into() },
                Event { id: Some("18".into()), event: "reset".into(), data: "x\ny".into() },
            ]
        );
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_fields_do_not_leak() {
        let mut p = Parser::default();
        assert_eq!(
            p.push(b"id: 1\nevent: OrderCreated\n\ndata: z\n\n"),
            vec![Event { id: None, event: "message".into(), data: "z".into() }]
        );
    }
}
