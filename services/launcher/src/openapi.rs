//! The public OpenAPI document: every service's document (generated from its
//! handlers by utoipa), with paths as the gateway exposes them, the seed's
//! `JWT` cookie scheme and a bearer scheme.
//! `order-system openapi` writes these documents to `contracts/openapi/`;
//! the gateway serves the public one, and a test checks the committed copies
//! match the code and the seed's contract.

use utoipa::OpenApi as _;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::server::Server;
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder};

/// Each service's internal document and the public prefix of its paths.
pub fn service_documents() -> Vec<(&'static str, &'static str, OpenApi)> {
    vec![
        ("identity", "/identity", identity::ApiDoc::openapi()),
        ("billing", "/billing", billing::ApiDoc::openapi()),
        ("ordering", "/ordering", ordering::ApiDoc::openapi()),
        ("notification", "", notification::ApiDoc::openapi()),
        ("push", "/push", push_service::ApiDoc::openapi()),
    ]
}

pub fn public_document() -> OpenApi {
    let mut doc = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Order system public API")
                .version("1.0.0")
                .description(Some(
                    "The public REST API behind the gateway: `shared/seed/public-api.yaml`, with additive \
                     changes: order creation answers 202 with the pending order and a Location, \
                     `GET /ordering/orders/{id}` for polling, and the event stream `GET /push/orders`.",
                ))
                .license(Some(utoipa::openapi::LicenseBuilder::new().name("MIT").identifier(Some("MIT")).build()))
                .build(),
        )
        .servers(Some([Server::new("/api/v1")]))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    for (_, prefix, service) in service_documents() {
        for (path, item) in service.paths.paths {
            let public = format!("{prefix}{}", path.strip_prefix("/api/v1").unwrap_or(&path));
            doc.paths.paths.insert(public, item);
        }
        if let Some(c) = service.components {
            components.schemas.extend(c.schemas);
        }
        for tag in service.tags.unwrap_or_default() {
            doc.tags.get_or_insert_with(Vec::new).push(tag);
        }
    }
    components.add_security_scheme("JWT", SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("accessToken"))));
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
    );
    doc.security = Some(vec![
        SecurityRequirement::new("JWT", Vec::<String>::new()),
        SecurityRequirement::new("bearer", Vec::<String>::new()),
    ]);
    doc
}

/// The documents by file name, as committed under `contracts/openapi/`.
pub fn all_documents() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = service_documents()
        .into_iter()
        .map(|(name, _, doc)| (format!("{name}.json"), doc.to_pretty_json().expect("serialises") + "\n"))
        .collect();
    files.push(("public-api.json".into(), public_document().to_pretty_json().expect("serialises") + "\n"));
    files
}
