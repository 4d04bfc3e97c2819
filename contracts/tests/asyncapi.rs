//! The AsyncAPI document: the committed copy is what the types generate, it
//! says who publishes and consumes what as the design does, and its payload
//! schemas accept exactly the JSON serde writes.

use chrono::{TimeZone, Utc};
use contracts::Message;
use contracts::asyncapi::{self, COMMITTED_PATH, REGENERATE};
use contracts::messages::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

#[test]
fn committed_document_is_what_the_types_generate() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/asyncapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = asyncapi::document_json();
    if committed != generated {
        let line = committed.lines().zip(generated.lines()).position(|(a, b)| a != b).map_or_else(
            || {
                format!(
                    "the documents differ in length ({} vs {} lines)",
                    committed.lines().count(),
                    generated.lines().count()
                )
            },
            |i| {
                format!(
                    "first difference at line {}:\n  committed: {}\n  generated: {}",
                    i + 1,
                    committed.lines().nth(i).unwrap_or(""),
                    generated.lines().nth(i).unwrap_or("")
                )
            },
        );
        panic!(
            "{COMMITTED_PATH} is out of date with the message types and topology in contracts/ ({line}).\n\
             Regenerate it from the workspace root and commit it:\n\n    {REGENERATE}\n"
        );
    }
}

fn doc() -> Value {
    asyncapi::document()
}

/// (service, message) pairs of the operations with `action`.
fn operations(doc: &Value, action: &str) -> BTreeSet<(String, String)> {
    doc["operations"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, op)| op["action"] == action)
        .map(|(id, op)| {
            let service = op["tags"][0]["name"].as_str().unwrap().to_string();
            assert!(id.starts_with(&format!("{service}.{action}.")), "{id}");
            let r = op["messages"][0]["$ref"].as_str().unwrap();
            (service, r.rsplit('/').next().unwrap().to_string())
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn publishers_and_consumers_are_those_of_the_design() {
    let doc = doc();
    assert_eq!(
        operations(&doc, "send"),
        pairs(&[
            ("identity", "UserCreated"),
            ("identity", "UserUpdated"),
            ("billing", "PaymentCreated"),
            ("billing", "PaymentFailed"),
            ("ordering", "CreatePayment"),
            ("ordering", "VoidPayment"),
            ("ordering", "OrderCreated"),
            ("ordering", "OrderFailed"),
            ("notification", "NotificationCreated"),
        ])
    );
    assert_eq!(
        operations(&doc, "receive"),
        pairs(&[
            ("billing", "UserCreated"),
            ("billing", "CreatePayment"),
            ("billing", "VoidPayment"),
            ("ordering", "PaymentCreated"),
            ("ordering", "PaymentFailed"),
            ("notification", "UserCreated"),
            ("notification", "UserUpdated"),
            ("notification", "OrderCreated"),
            ("notification", "OrderFailed"),
            ("push-service", "OrderCreated"),
            ("push-service", "OrderFailed"),
            ("push-service", "NotificationCreated"),
        ])
    );
}

#[test]
fn every_message_travels_on_its_exchange_with_its_routing_key() {
    fn check<M: Message>(doc: &Value) {
        let channel = &doc["channels"][M::NAME];
        assert_eq!(channel["address"], M::NAME);
        let amqp = &channel["bindings"]["amqp"];
        assert_eq!(amqp["is"], "routingKey");
        assert_eq!(
            amqp["exchange"],
            json!({"name": M::EXCHANGE, "type": "topic", "durable": true, "autoDelete": false, "vhost": "/"})
        );
        let message = &doc["components"]["messages"][M::NAME];
        assert_eq!(message["bindings"]["amqp"]["messageType"], M::NAME);
        assert_eq!(message["contentType"], "application/json");
    }
    let doc = doc();
    check::<UserCreated>(&doc);
    check::<UserUpdated>(&doc);
    check::<CreatePayment>(&doc);
    check::<VoidPayment>(&doc);
    check::<PaymentCreated>(&doc);
    check::<PaymentFailed>(&doc);
    check::<OrderCreated>(&doc);
    check::<OrderFailed>(&doc);
    check::<NotificationCreated>(&doc);
    assert_eq!(doc["components"]["messages"].as_object().unwrap().len(), asyncapi::MESSAGES.len());

    // Every durable queue of the topology is a quorum queue channel with its bindings.
    for q in contracts::topology::QUEUES {
        let amqp = &doc["channels"][q.name]["bindings"]["amqp"];
        assert_eq!(amqp["is"], "queue");
        assert_eq!(amqp["queue"]["name"], q.name);
        assert_eq!(amqp["queue"]["durable"], true);
        assert_eq!(amqp["x-queue-type"], "quorum");
        let keys: Vec<&str> =
            amqp["x-bindings"].as_array().unwrap().iter().map(|b| b["routingKey"].as_str().unwrap()).collect();
        assert_eq!(keys, q.routing_keys);
    }
}

/// A check of `value` against `schema`, for the keywords the document uses.
fn validate(doc: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.strip_prefix("#/components/schemas/").expect("a component schema");
        return validate(doc, &doc["components"]["schemas"][name], value, path, errors);
    }
    let type_of = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
        _ => vec![],
    };
    // An integer is a number whose value is whole (JSON Schema).
    let integer = value.is_i64() || value.is_u64();
    let typed = types.is_empty() || types.contains(&type_of(value)) || (integer && types.contains(&"integer"));
    if !typed {
        errors.push(format!("{path}: {value} is not of type {types:?}"));
        return;
    }
    match (schema["format"].as_str(), value.as_str()) {
        (Some("uuid"), Some(s)) if Uuid::parse_str(s).is_err() => errors.push(format!("{path}: not a uuid")),
        (Some("date-time"), Some(s)) if chrono::DateTime::parse_from_rfc3339(s).is_err() => {
            errors.push(format!("{path}: not an RFC 3339 date-time"))
        }
        _ => {}
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema["exclusiveMinimum"].as_f64()
            && n <= min
        {
            errors.push(format!("{path}: {n} <= {min}"));
        }
        if let Some(max) = schema["maximum"].as_f64()
            && n > max
        {
            errors.push(format!("{path}: {n} > {max}"));
        }
        if schema["multipleOf"] == json!(0.01) {
            let text = value.to_string();
            if text.split('.').nth(1).is_some_and(|f| f.len() > 2) {
                errors.push(format!("{path}: {text} has more than two decimals"));
            }
        }
    }
    if let Value::Object(fields) = value {
        let properties = schema["properties"].as_object().cloned().unwrap_or_default();
        for required in schema["required"].as_array().into_iter().flatten() {
            if !fields.contains_key(required.as_str().unwrap()) {
                errors.push(format!("{path}: required {required} missing"));
            }
        }
        for (key, v) in fields {
            match properties.get(key) {
                Some(s) => validate(doc, s, v, &format!("{path}.{key}"), errors),
                None => errors.push(format!("{path}: {key} is not a property of the schema")),
            }
        }
    }
}

fn payload_errors<M: Message>(doc: &Value, message: &M) -> Vec<String> {
    let json = serde_json::to_value(message).unwrap();
    let mut errors = Vec::new();
    validate(doc, &doc["components"]["messages"][M::NAME]["payload"], &json, M::NAME, &mut errors);
    errors
}

#[test]
fn payload_schemas_describe_the_json_serde_writes() {
    let doc = doc();
    let id = Uuid::now_v7();
    let at = Utc.with_ymd_and_hms(2026, 11, 26, 6, 0, 0).unwrap();
    let price = "12.5".parse().unwrap();
    let full = UserCreated {
        id,
        email: "ann@example.com".into(),
        first_name: Some("Ann".into()),
        last_name: Some("Lee".into()),
        phone: Some("+1 555".into()),
        version: 1,
    };
    let bare = UserCreated { first_name: None, last_name: None, phone: None, ..full.clone() };
    let mut errors = BTreeMap::new();
    let mut record = |name: &str, e: Vec<String>| {
        if !e.is_empty() {
            errors.insert(name.to_string(), e);
        }
    };
    record("UserCreated (full)", payload_errors(&doc, &full));
    record("UserCreated (bare)", payload_errors(&doc, &bare));
    let updated = UserUpdated {
        id,
        email: "a@b.c".into(),
        first_name: None,
        last_name: Some("L".into()),
        phone: None,
        version: 2,
    };
    record("UserUpdated", payload_errors(&doc, &updated));
    record("CreatePayment", payload_errors(&doc, &CreatePayment { id, user_id: id, amount: "600".parse().unwrap() }));
    record("VoidPayment", payload_errors(&doc, &VoidPayment { id, user_id: id, amount: "600".parse().unwrap() }));
    record("PaymentCreated", payload_errors(&doc, &PaymentCreated { id }));
    record("PaymentFailed", payload_errors(&doc, &PaymentFailed { id, reason: NOT_ENOUGH_MONEY.into() }));
    record("OrderCreated", payload_errors(&doc, &OrderCreated { order_id: id, user_id: id, price, occurred_at: at }));
    let failed = OrderFailed { order_id: id, user_id: id, price, reason: NOT_ENOUGH_MONEY.into(), occurred_at: at };
    record("OrderFailed", payload_errors(&doc, &failed));
    let notified = NotificationCreated {
        id,
        user_id: id,
        order_id: Some(id),
        message: "Your order for 12.50$ has been successfully processed".into(),
        created_at: at,
    };
    record("NotificationCreated", payload_errors(&doc, &notified));
    record("NotificationCreated", payload_errors(&doc, &NotificationCreated { order_id: None, ..notified }));
    assert!(errors.is_empty(), "payloads that do not match their schema: {errors:#?}");

    // Optional fields are optional and nullable; camelCase names; the correlation id points at a field.
    let user = &doc["components"]["messages"]["UserCreated"]["payload"];
    assert_eq!(user["required"], json!(["id", "email"]));
    assert_eq!(user["properties"]["firstName"]["type"], json!(["string", "null"]));
    let order = &doc["components"]["messages"]["OrderFailed"];
    assert_eq!(order["correlationId"]["location"], "$message.payload#/orderId");
    assert_eq!(order["payload"]["properties"]["occurredAt"]["format"], "date-time");
    assert_eq!(order["payload"]["properties"]["price"]["$ref"], "#/components/schemas/Money");

    // The schema refuses what Money refuses.
    let money = &doc["components"]["schemas"]["Money"];
    for bad in [json!(0), json!(-5), json!(1.234), json!("10"), json!(1e13)] {
        let mut e = Vec::new();
        validate(&doc, money, &bad, "money", &mut e);
        assert!(!e.is_empty(), "{bad} passed the Money schema");
        assert!(serde_json::from_value::<contracts::Money>(bad).is_err());
    }
}
