//! The API contracts: the committed OpenAPI documents are what the code
//! generates, they are served, and the public one is a compatible superset of
//! the seed's `public-api.yaml`.

use crate::helpers::TestApp;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_openapi_documents_match_the_code() {
    for (name, generated) in order_system::openapi::all_documents() {
        let path = repo().join("contracts/openapi").join(&name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from what the code generates; run `cargo run -p order-system -- openapi` and commit it",
            path.display()
        );
    }
}

/// A schema reduced to what compatibility is judged on.
#[derive(Debug)]
struct Shape {
    types: BTreeSet<String>,
    format: Option<String>,
    properties: Vec<(String, Value)>,
    required: BTreeSet<String>,
    items: Option<Value>,
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

fn shape(doc: &Value, schema: &Value) -> Shape {
    let s = resolve(doc, schema);
    let mut out = Shape {
        types: BTreeSet::new(),
        format: s.get("format").and_then(Value::as_str).map(str::to_string),
        properties: Vec::new(),
        required: BTreeSet::new(),
        items: s.get("items").cloned(),
    };
    match s.get("type") {
        Some(Value::String(t)) => {
            out.types.insert(t.clone());
        }
        Some(Value::Array(ts)) => out.types.extend(ts.iter().filter_map(Value::as_str).map(str::to_string)),
        _ => {}
    }
    for part in s.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        let p = shape(doc, part);
        out.types.extend(p.types);
        out.properties.extend(p.properties);
        out.required.extend(p.required);
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        out.properties.extend(props.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.types.insert("object".into());
    }
    out.required.extend(
        s.get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string)),
    );
    out
}

/// `ours` can stand where the seed has `seed`: same kind of value, same
/// format where both say one, and every property of the seed's object.
fn compatible(seed_doc: &Value, seed: &Value, our_doc: &Value, ours: &Value, at: &str, problems: &mut Vec<String>) {
    let (s, o) = (shape(seed_doc, seed), shape(our_doc, ours));
    for t in &s.types {
        let ok = o.types.contains(t) || (t == "number" && o.types.contains("integer"));
        if !ok {
            problems.push(format!("{at}: seed type {t}, ours {:?}", o.types));
        }
    }
    if let (Some(sf), Some(of)) = (&s.format, &o.format)
        && sf != of
    {
        problems.push(format!("{at}: seed format {sf}, ours {of}"));
    }
    for (name, seed_prop) in &s.properties {
        match o.properties.iter().find(|(n, _)| n == name) {
            Some((_, our_prop)) => {
                compatible(seed_doc, seed_prop, our_doc, our_prop, &format!("{at}.{name}"), problems)
            }
            None => problems.push(format!("{at}: property {name} missing")),
        }
    }
    if let (Some(si), Some(oi)) = (&s.items, &o.items) {
        compatible(seed_doc, si, our_doc, oi, &format!("{at}[]"), problems);
    }
}

/// A request body of ours accepts what the seed's clients send: every field
/// we require is one the seed's schema has.
fn accepts(seed_doc: &Value, seed: &Value, our_doc: &Value, ours: &Value, at: &str, problems: &mut Vec<String>) {
    let (s, o) = (shape(seed_doc, seed), shape(our_doc, ours));
    for name in &o.required {
        if !s.properties.iter().any(|(n, _)| n == name) {
            problems.push(format!("{at}: we require {name}, which the seed's request does not have"));
        }
    }
    for (name, our_prop) in &o.properties {
        if let Some((_, seed_prop)) = s.properties.iter().find(|(n, _)| n == name) {
            compatible(seed_doc, seed_prop, our_doc, our_prop, &format!("{at}.{name}"), problems);
        }
    }
}

fn json_schema(op: &Value, path: &[&str]) -> Option<Value> {
    let mut v = op;
    for p in path {
        v = v.get(*p)?;
    }
    Some(v.clone())
}

#[test]
fn the_public_api_is_a_compatible_superset_of_the_seed() {
    // The seed's contract, as committed beside ours (a copy of shared/seed/public-api.yaml).
    let seed_text =
        std::fs::read_to_string(repo().join("contracts/seed/public-api.yaml")).expect("the seed's contract");
    let seed: Value = serde_yaml::from_str(&seed_text).unwrap();
    let ours: Value = serde_json::to_value(order_system::openapi::public_document()).unwrap();
    let mut problems = Vec::new();

    assert_eq!(ours["components"]["securitySchemes"]["JWT"], seed["components"]["securitySchemes"]["JWT"]);
    assert!(ours["security"].as_array().unwrap().iter().any(|r| r.get("JWT").is_some()), "JWT is required by default");

    for (path, item) in seed["paths"].as_object().unwrap() {
        for (method, seed_op) in item.as_object().unwrap() {
            let at = format!("{} {path}", method.to_uppercase());
            let Some(our_op) = ours["paths"].get(path).and_then(|p| p.get(method)) else {
                problems.push(format!("{at}: missing"));
                continue;
            };
            // Public operations stay public.
            if seed_op.get("security").is_some_and(|s| s.as_array().is_some_and(Vec::is_empty)) {
                let public = our_op["security"]
                    .as_array()
                    .is_some_and(|s| s.is_empty() || s.iter().all(|r| r.as_object().is_some_and(|o| o.is_empty())));
                if !public {
                    problems.push(format!("{at}: the seed needs no token, ours does"));
                }
            }
            for (code, seed_resp) in seed_op["responses"].as_object().unwrap() {
                // The documented change: order creation answers 202 with the order.
                let our_code = if (path.as_str(), method.as_str(), code.as_str()) == ("/ordering/orders", "post", "204")
                {
                    "202"
                } else {
                    code.as_str()
                };
                let Some(our_resp) = our_op["responses"].get(our_code) else {
                    problems.push(format!("{at}: response {our_code} missing"));
                    continue;
                };
                if let (Some(s), Some(o)) = (
                    json_schema(seed_resp, &["content", "application/json", "schema"]),
                    json_schema(our_resp, &["content", "application/json", "schema"]),
                ) {
                    compatible(&seed, &s, &ours, &o, &format!("{at} {code}"), &mut problems);
                }
            }
            if let (Some(s), Some(o)) = (
                json_schema(seed_op, &["requestBody", "content", "application/json", "schema"]),
                json_schema(our_op, &["requestBody", "content", "application/json", "schema"]),
            ) {
                accepts(&seed, &s, &ours, &o, &format!("{at} request"), &mut problems);
            }
        }
    }
    assert!(problems.is_empty(), "incompatible with the seed:\n{}", problems.join("\n"));
}

#[tokio::test]
async fn services_and_the_gateway_serve_their_documents() {
    let app = TestApp::spawn().await;
    let r = app.http.get(format!("{}/openapi.json", app.gateway)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let served: Value = r.json().await.unwrap();
    assert_eq!(served, serde_json::to_value(order_system::openapi::public_document()).unwrap());
    let r = app.http.get(format!("{}/docs/", app.gateway)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("swagger"), "Swagger UI");
    app.stop().await;
}

/// The `(service, message)` pairs a publisher declares in its wiring.
fn declared<P: runtime::messaging::outbox::Publisher>() -> impl Iterator<Item = (String, String)> {
    P::MESSAGES.iter().map(|m| (P::SERVICE.to_string(), m.to_string()))
}

#[test]
fn what_each_service_declares_it_publishes_is_what_the_asyncapi_document_says() {
    let declared: BTreeSet<(String, String)> = declared::<identity::Identity>()
        .chain(declared::<billing::Billing>())
        .chain(declared::<ordering::Ordering>())
        .chain(declared::<notification::Notification>())
        .collect();
    let path = repo().join("contracts/asyncapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let documented: BTreeSet<(String, String)> = doc["operations"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, op)| op["action"] == "send")
        .map(|(key, _)| {
            let (service, message) = key.split_once(".send.").unwrap_or_else(|| panic!("operation {key}"));
            (service.to_string(), message.to_string())
        })
        .collect();
    assert!(!declared.is_empty());
    assert_eq!(declared, documented, "publishers declared in the wiring (left) vs {} (right)", path.display());
}
