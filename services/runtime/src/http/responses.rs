//! The error answers many operations share, as utoipa response types:
//! `responses((status = 200, ...), NotAuthenticated, UnexpectedError)`
//! instead of the same tuples in every handler's annotation.

use contracts::api::ErrorBody;

/// 401: no valid token (or, behind the gateway, no valid assertion from it).
#[derive(utoipa::IntoResponses)]
#[response(status = 401, description = "Not authenticated")]
pub struct NotAuthenticated(pub ErrorBody);

/// Any other status: the error body says what happened.
#[derive(utoipa::IntoResponses)]
#[response(status = "default", description = "Unexpected error")]
pub struct UnexpectedError(pub ErrorBody);
