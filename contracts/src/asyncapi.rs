//! The AsyncAPI 3.0 document of the system's messages, generated from the
//! types themselves (feature `asyncapi`).
//!
//! asyncapi-rust derives the messages and their payload schemas (schemars,
//! so they follow the serde attributes: camelCase names, optional fields,
//! uuid and date-time formats, [`Money`](crate::Money) as a number). It knows
//! no AMQP, so [`document`] then adds what travels where, all of it read from
//! the types and [`crate::topology`]:
//!
//! - a channel per message: its routing key on its publisher's topic
//!   exchange (`bindings.amqp.is = routingKey`), and a `send` operation for
//!   the publisher (the exchange is named after the context that publishes);
//! - a channel per consuming queue (`bindings.amqp.is = queue`) with the
//!   messages bound to it, and a `receive` operation per consumer and
//!   message; the consumer is the queue name's prefix. Every push-service
//!   replica reads the stream [`topology::PUSH_STREAM`] of
//!   [`topology::PUSH_ORDER_EVENTS`] and
//!   [`topology::PUSH_NOTIFICATION_EVENTS`] from its own offset (two
//!   channels, one per exchange, of the same stream);
//! - per message: the AMQP `type` (message binding `messageType`), the
//!   `correlationId` (the payload field sent as `correlation_id`), the
//!   `traceparent` header and the other properties.
//!
//! `cargo run -p contracts --features asyncapi --bin asyncapi > contracts/asyncapi.json`
//! writes the committed copy; a test fails when it differs.

use crate::messages::{
    CorrelationField, CreatePayment, Message, NotificationCreated, OrderCreated, OrderFailed, PaymentCreated,
    PaymentFailed, UserCreated, UserUpdated, VoidPayment,
};
use crate::topology::{self, QueueSpec};
use asyncapi_rust::AsyncApi;
use serde_json::{Map, Value, json};

/// The command that regenerates the committed document.
pub const REGENERATE: &str = "cargo run -p contracts --features asyncapi --bin asyncapi > contracts/asyncapi.json";

/// The committed document, relative to the workspace root.
pub const COMMITTED_PATH: &str = "contracts/asyncapi.json";

/// The version of the AMQP bindings used.
const AMQP_BINDING_VERSION: &str = "0.3.0";

/// The server key in the document.
const SERVER: &str = "rabbitmq";

/// What the document needs to know of one message type beyond its schema.
#[derive(Clone, Copy, Debug)]
pub struct MessageInfo {
    /// The message name: AMQP `type` and routing key.
    pub name: &'static str,
    /// The topic exchange it is published to, named after the publisher.
    pub exchange: &'static str,
    /// The Rust name of the payload field sent as `correlation_id`.
    pub correlation_field: &'static str,
}

impl MessageInfo {
    const fn of<M: CorrelationField>() -> Self {
        MessageInfo { name: M::NAME, exchange: M::EXCHANGE, correlation_field: M::CORRELATION_FIELD }
    }

    /// The service that publishes it: the exchange is named after it.
    pub fn publisher(&self) -> &'static str {
        self.exchange
    }
}

/// Lists every message once: for asyncapi-rust's derive and for the bindings.
macro_rules! messages {
    ($($ty:ident),* $(,)?) => {
        /// The messages as asyncapi-rust derives them (info, server, message
        /// components with their payload schemas).
        #[derive(AsyncApi)]
        #[asyncapi(
            title = "Order system messages",
            version = "0.0.0",
            description = "The messages the services of the order system exchange over RabbitMQ."
        )]
        #[asyncapi_server(
            name = "rabbitmq",
            host = "localhost:5672",
            protocol = "amqp",
            description = "The RabbitMQ broker every service but the gateway connects to (AMQP_URL, vhost /)."
        )]
        #[asyncapi_messages($($ty),*)]
        pub struct OrderSystemMessages;

        /// Every message of the system, in the order of the document.
        pub const MESSAGES: &[MessageInfo] = &[$(MessageInfo::of::<$ty>()),*];
    };
}

messages!(
    UserCreated,
    UserUpdated,
    CreatePayment,
    VoidPayment,
    PaymentCreated,
    PaymentFailed,
    OrderCreated,
    OrderFailed,
    NotificationCreated
);

/// A consuming queue, as the document shows it.
#[derive(Clone, Debug)]
pub struct Consumer {
    /// The consuming service.
    pub service: &'static str,
    /// The channel key in the document.
    pub channel: &'static str,
    pub queue: &'static str,
    pub exchange: &'static str,
    pub routing_keys: &'static [&'static str],
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// `quorum` or `stream`.
    pub queue_type: &'static str,
}

/// Who consumes what: the durable queues of [`topology::QUEUES`] (the
/// service is the queue name's prefix) and the push service's stream.
pub fn consumers() -> Vec<Consumer> {
    let mut consumers: Vec<Consumer> = topology::QUEUES
        .iter()
        .map(|q: &QueueSpec| Consumer {
            service: q.name.split('.').next().unwrap_or(q.name),
            channel: q.name,
            queue: q.name,
            exchange: q.exchange,
            routing_keys: q.routing_keys,
            durable: true,
            exclusive: false,
            auto_delete: false,
            queue_type: "quorum",
        })
        .collect();
    consumers.push(Consumer {
        service: "push-service",
        channel: "push",
        queue: topology::PUSH_STREAM,
        exchange: OrderCreated::EXCHANGE,
        routing_keys: topology::PUSH_ORDER_EVENTS,
        durable: true,
        exclusive: false,
        auto_delete: false,
        queue_type: "stream",
    });
    consumers.push(Consumer {
        service: "push-service",
        channel: "push.notifications",
        queue: topology::PUSH_STREAM,
        exchange: NotificationCreated::EXCHANGE,
        routing_keys: topology::PUSH_NOTIFICATION_EVENTS,
        durable: true,
        exclusive: false,
        auto_delete: false,
        queue_type: "stream",
    });
    consumers
}

/// `order_id` → `orderId`, as `#[serde(rename_all = "camelCase")]` does.
fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn info_of(name: &str) -> &'static MessageInfo {
    MESSAGES.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("message {name} is not in MESSAGES"))
}

/// Removes the JSON Schema dialect marker schemars puts on each payload: an
/// AsyncAPI payload is an AsyncAPI Schema object, a superset of draft 07.
fn strip_dialect(schema: &mut Value) {
    if let Some(obj) = schema.as_object_mut() {
        obj.remove("$schema");
    }
}

fn obj(value: &mut Value) -> &mut Map<String, Value> {
    value.as_object_mut().expect("a JSON object")
}

/// The whole document: asyncapi-rust's output with the AMQP channels,
/// operations and bindings added.
pub fn document() -> Value {
    let spec = OrderSystemMessages::asyncapi_spec();
    let mut doc = serde_json::to_value(&spec).expect("the AsyncAPI model serialises");
    let consumers = consumers();

    // Info: the crate's version and license; JSON by default.
    {
        let info = obj(&mut doc["info"]);
        info.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        info.insert("license".into(), json!({ "name": env!("CARGO_PKG_LICENSE") }));
        info.insert(
            "description".into(),
            json!(
                "The messages the services of the order system exchange over RabbitMQ, generated from the types \
                 in `contracts/src/messages.rs` and the topology in `contracts/src/topology.rs`.\n\n\
                 Each publishing context has one durable topic exchange named after it; the routing key is the \
                 message name. Each consuming service has one durable quorum queue per source, bound to the keys \
                 it handles; the push service keeps order events in the stream `push.order-events`, which every \
                 replica reads from its own offset (the offsets are the server-sent event ids). A message is published \
                 persistent and mandatory with publisher confirms (transactional outbox), consumed with manual \
                 ack after its effect committed (idempotent by `message_id`); a failing message is retried \
                 through `<queue>.delay.<ms>ms` queues (dead-lettered back at least once), then parked in `<queue>.dead`. \
                 Each consumed queue dead-letters to `<queue>.dead` at least once past its delivery limit of 20 \
                 (`x-delivery-limit`); dead letters of transient causes are replayed automatically, at most 3 times."
            ),
        );
    }
    obj(&mut doc).insert("defaultContentType".into(), json!("application/json"));
    obj(&mut doc["servers"][SERVER]).insert("protocolVersion".into(), json!("0.9.1"));

    // Messages: payload cleanup, AMQP type, correlation id, headers.
    for (name, message) in obj(&mut doc["components"]["messages"]).iter_mut() {
        let info = info_of(name);
        strip_dialect(&mut message["payload"]);
        // The type's doc comment, on one line.
        let summary = message["payload"]["description"]
            .as_str()
            .map(|d| Value::String(d.split_whitespace().collect::<Vec<_>>().join(" ")));
        let correlation = camel_case(info.correlation_field);
        assert!(
            message["payload"]["properties"].get(&correlation).is_some(),
            "{name}: correlation field {correlation} is not in the payload"
        );
        let m = obj(message);
        if let Some(summary) = summary {
            m.insert("summary".into(), summary);
        }
        m.insert(
            "description".into(),
            json!(format!(
                "Published by {publisher} to the topic exchange `{exchange}` with routing key `{name}`. \
                 AMQP properties: `message_id` (a UUID, unique per message: consumers deduplicate on it), \
                 `type` = `{name}`, `content_type` = `application/json`, `timestamp` (seconds), \
                 `correlation_id` = the payload's `{correlation}`, delivery mode 2 (persistent); \
                 header `traceparent` (W3C trace context) when the publisher traces. The body is the payload's JSON.",
                publisher = info.publisher(),
                exchange = info.exchange,
            )),
        );
        m.insert(
            "headers".into(),
            json!({
                "type": "object",
                "description": "AMQP message headers (the application headers table).",
                "properties": {
                    "traceparent": {
                        "type": "string",
                        "description": "W3C trace context of the operation that raised the message.",
                        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                        "examples": ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
                    }
                }
            }),
        );
        m.insert(
            "correlationId".into(),
            json!({
                "description": format!("The AMQP `correlation_id` property: the payload's `{correlation}`."),
                "location": format!("$message.payload#/{correlation}"),
            }),
        );
        m.insert("bindings".into(), json!({ "amqp": { "messageType": name, "bindingVersion": AMQP_BINDING_VERSION } }));
    }
    for schema in obj(&mut doc["components"]["schemas"]).values_mut() {
        strip_dialect(schema);
    }

    let mut channels = Map::new();
    let mut operations = Map::new();

    // A channel per message (its routing key on its exchange), sent by its publisher.
    for info in MESSAGES {
        let name = info.name;
        channels.insert(
            name.into(),
            json!({
                "address": name,
                "title": format!("{name} on exchange {}", info.exchange),
                "description": format!(
                    "Routing key `{name}` on the durable topic exchange `{}`.",
                    info.exchange
                ),
                "messages": { name: { "$ref": format!("#/components/messages/{name}") } },
                "bindings": { "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": info.exchange,
                        "type": "topic",
                        "durable": true,
                        "autoDelete": false,
                        "vhost": "/"
                    },
                    "bindingVersion": AMQP_BINDING_VERSION
                } }
            }),
        );
        operations.insert(
            format!("{}.send.{name}", info.publisher()),
            json!({
                "action": "send",
                "channel": { "$ref": format!("#/channels/{name}") },
                "messages": [{ "$ref": format!("#/channels/{name}/messages/{name}") }],
                "title": format!("{} publishes {name}", info.publisher()),
                "summary": format!(
                    "{} publishes {name} to exchange `{}` (from its transactional outbox, with publisher confirms).",
                    info.publisher(),
                    info.exchange
                ),
                "tags": [{ "name": info.publisher() }],
                "bindings": { "amqp": {
                    "deliveryMode": 2,
                    "mandatory": true,
                    "timestamp": true,
                    "bindingVersion": AMQP_BINDING_VERSION
                } }
            }),
        );
    }

    // A channel per consuming queue, received by its service.
    for c in &consumers {
        let mut messages = Map::new();
        for key in c.routing_keys {
            let info = info_of(key);
            assert_eq!(info.exchange, c.exchange, "queue {} binds {key} on the wrong exchange", c.queue);
            messages.insert((*key).into(), json!({ "$ref": format!("#/components/messages/{key}") }));
        }
        let keys = c.routing_keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
        let (kind, extra) = if c.queue_type == "quorum" {
            (
                "durable quorum queue",
                format!(
                    " A failing message is retried through `{q}.delay.<ms>ms` queues (dead-lettered back at least once), then parked in `{q}.dead`.",
                    q = c.queue
                ),
            )
        } else {
            ("durable stream", " Every push-service replica reads it from its own offset, so each sees every order event and can resume any id.".to_string())
        };
        let channel = json!({
            "address": c.queue,
            "title": format!("queue {}", c.queue),
            "description": format!(
                "The {kind} of {service}, bound to exchange `{exchange}` with routing keys {keys}.{extra}",
                service = c.service,
                exchange = c.exchange,
            ),
            "messages": messages,
            "bindings": { "amqp": {
                "is": "queue",
                "queue": {
                    "name": c.queue,
                    "durable": c.durable,
                    "exclusive": c.exclusive,
                    "autoDelete": c.auto_delete,
                    "vhost": "/"
                },
                "x-queue-type": c.queue_type,
                "x-bindings": c.routing_keys.iter()
                    .map(|k| json!({ "exchange": c.exchange, "routingKey": k }))
                    .collect::<Vec<_>>(),
                "bindingVersion": AMQP_BINDING_VERSION
            } }
        });
        channels.insert(c.channel.into(), channel);
        for key in c.routing_keys {
            operations.insert(
                format!("{}.receive.{key}", c.service),
                json!({
                    "action": "receive",
                    "channel": { "$ref": format!("#/channels/{}", c.channel) },
                    "messages": [{ "$ref": format!("#/channels/{}/messages/{key}", c.channel) }],
                    "title": format!("{} consumes {key}", c.service),
                    "summary": format!("{} consumes {key} from queue `{}`.", c.service, c.queue),
                    "tags": [{ "name": c.service }],
                    "bindings": { "amqp": { "ack": true, "bindingVersion": AMQP_BINDING_VERSION } }
                }),
            );
        }
    }

    let root = obj(&mut doc);
    root.insert("channels".into(), Value::Object(channels));
    root.insert("operations".into(), Value::Object(operations));
    canonical(doc)
}

/// Sorts every object's keys, so the text is the same whatever map order
/// serde_json was built with (another crate may turn on `preserve_order`).
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// The document as committed: pretty JSON with a final newline.
pub fn document_json() -> String {
    let mut text = serde_json::to_string_pretty(&document()).expect("JSON serialises");
    text.push('\n');
    text
}
