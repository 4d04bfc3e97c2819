//! HTTP plumbing shared by the services, one concern per module: the error
//! type that becomes the seed's `Error {code, message}` body, extractors whose
//! rejections use that body too, newest-first paging, health endpoints, the
//! server every service runs, per-user rate limits, and the error answers the
//! API documents share.

pub mod conditional;
pub mod connections;
pub mod idempotency;
pub mod limits;
pub mod openapi;

mod error;
mod extract;
mod health;
mod page;
mod rate;
pub mod responses;
mod server;

pub use error::{ApiError, DATABASE_RETRY_AFTER, error_response};
pub use extract::{Json, Path, Query};
pub use health::{Readiness, health_routes};
pub use page::{Page, PageLimit};
pub use rate::{PerUserLimits, PerUserRate};
pub use server::{
    BODY_LIMIT, MAX_REQUEST_ID_LEN, is_safe_request_id, not_found, serve, service_router, with_common_layers,
};
