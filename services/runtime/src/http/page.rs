//! Newest-first pages of a user's list (`?limit`, `?before`).

use super::ApiError;

/// A page of a newest-first list: at most `limit` items, older than the item
/// `before` (the last one of the previous page). The query of each list says
/// `WHERE user_id = $1 AND ($2::uuid IS NULL OR (created_at, id) < (SELECT
/// created_at, id FROM <table> WHERE id = $2 AND user_id = $1)) ORDER BY
/// created_at DESC, id DESC LIMIT $3`, written out beside its handler so the
/// compiler checks it.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// How many items, 1 to 500 (100 by default).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The id of the last item of the previous page.
    pub before: Option<uuid::Uuid>,
}

impl Page {
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=500) => Ok(i64::from(n)),
            Some(_) => Err(ApiError::bad_request("limit must be between 1 and 500")),
        }
    }
}
