//! The public API's contract, served as committed: `/openapi.json` and a
//! browsable Swagger UI at `/docs`. The committed document is generated from
//! the services' code (`order-system openapi`), and a test keeps them equal.

use axum::Router;
use utoipa_swagger_ui::SwaggerUi;

pub const PUBLIC_API: &str = include_str!("../../../contracts/openapi/public-api.json");

pub fn routes() -> Router {
    let spec: serde_json::Value = serde_json::from_str(PUBLIC_API).expect("the committed public API document is JSON");
    Router::new().merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", spec))
}
