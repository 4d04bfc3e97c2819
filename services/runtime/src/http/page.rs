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
    /// The page's size: `?limit` parsed, or the default.
    pub fn limit(&self) -> Result<PageLimit, ApiError> {
        self.limit.map_or(Ok(PageLimit::DEFAULT), PageLimit::parse)
    }
}

/// How many items a page holds: 1 to [`PageLimit::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLimit(u16);

impl PageLimit {
    pub const MAX: u16 = 500;
    pub const DEFAULT: PageLimit = PageLimit(100);

    pub fn parse(n: u32) -> Result<PageLimit, ApiError> {
        match u16::try_from(n) {
            Ok(n @ 1..=Self::MAX) => Ok(PageLimit(n)),
            _ => Err(ApiError::bad_request("limit must be between 1 and 500")),
        }
    }

    /// For the query's `LIMIT`.
    pub fn get(self) -> i64 {
        i64::from(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(limit: Option<u32>) -> Page {
        Page { limit, before: None }
    }

    #[test]
    fn no_limit_means_a_hundred() {
        assert_eq!(page(None).limit().unwrap().get(), 100);
    }

    #[test]
    fn the_bounds_are_included() {
        assert_eq!(page(Some(1)).limit().unwrap().get(), 1);
        assert_eq!(page(Some(500)).limit().unwrap().get(), 500);
    }

    #[test]
    fn zero_and_above_500_are_a_400() {
        for n in [0, 501, 65_537, u32::MAX] {
            let e = page(Some(n)).limit().unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{n}");
            assert_eq!(e.message, "limit must be between 1 and 500");
        }
    }

    #[test]
    fn the_cursor_and_limit_come_from_the_query_string() {
        let axum::extract::Query(p) = axum::extract::Query::<Page>::try_from_uri(
            &"/x?limit=7&before=0193a6a0-0000-7000-8000-000000000001".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(p.limit, Some(7));
        assert_eq!(p.before.unwrap().to_string(), "0193a6a0-0000-7000-8000-000000000001");
    }

    #[test]
    fn a_cursor_that_is_not_an_id_is_refused() {
        let uri = "/x?before=yesterday".parse().unwrap();
        assert!(axum::extract::Query::<Page>::try_from_uri(&uri).is_err());
    }

    proptest! {
        #[test]
        fn any_limit_is_a_page_size_in_range_or_a_400(n in any::<u32>()) {
            match PageLimit::parse(n) {
                Ok(l) => prop_assert!((1..=500).contains(&l.get()) && l.get() == i64::from(n)),
                Err(e) => {
                    prop_assert!(n == 0 || n > 500);
                    prop_assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
                }
            }
        }
    }
}
