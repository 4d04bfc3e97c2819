//! OpenAPI documents generated from the handlers' own types (utoipa): each
//! service serves its internal document at `/openapi.json`.

use axum::Router;
use axum::routing::get;
use utoipa::Modify;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};

/// Services behind the gateway know the caller by the assertion it signs
/// (`X-User-Assertion`, see `runtime::auth`), in place of the seed's
/// `X-User-Id` (its `UserRequest` scheme, whose name is kept).
pub struct InternalAuth;

impl Modify for InternalAuth {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "UserRequest",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                crate::auth::ASSERTION_HEADER,
                "Who the caller is: an EdDSA JWT the gateway signs for one request to this service (the user's \
                 id and e-mail, the access token's id and expiry, the request's method and path, its own \
                 unique id, a life of a few seconds), verified with the gateway's public key \
                 (INTERNAL_VERIFY_KEY) and accepted once; set by the gateway only",
            ))),
        );
        doc.security = Some(vec![SecurityRequirement::new("UserRequest", Vec::<String>::new())]);
    }
}

/// `GET /openapi.json`: the document, rendered once.
pub fn route(doc: OpenApi) -> Router {
    let json = doc.to_pretty_json().expect("an OpenAPI document serialises");
    Router::new().route(
        "/openapi.json",
        get(move || {
            let json = json.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], json) }
        }),
    )
}
