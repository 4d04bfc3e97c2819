//! Extractors whose rejections are [`ApiError`]s with the project's error
//! body, so a malformed request always gets a clear 4xx. A JSON body's text
//! is checked here once for every field the handler reads: no control
//! characters (NUL, which PostgreSQL refuses in text, escapes, line breaks)
//! reach a handler. Fields the type does not have are ignored, as the
//! schemas allow.

use axum::extract::{FromRequest, FromRequestParts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::ApiError;

/// A JSON request body (always an object in this API, whose strings and keys
/// hold no control characters) or response. Its rejections are [`ApiError`]s
/// that say what is wrong.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned + Serialize,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_request(req, state).await?;
        // serde would also read a struct from an array; a body is an object.
        if !value.is_object() {
            return Err(ApiError::unprocessable("invalid request body: expected a JSON object"));
        }
        let parsed: T =
            serde_json::from_value(value).map_err(|e| ApiError::unprocessable(format!("invalid request body: {e}")))?;
        // What the handler will read, as the client named it.
        let read = serde_json::to_value(&parsed).map_err(ApiError::internal)?;
        if let Some(field) = control_characters_at(&read) {
            return Err(ApiError::unprocessable(format!(
                "invalid request body: {field} must not contain control characters"
            )));
        }
        Ok(Json(parsed))
    }
}

/// Where the first string (or key) holding a control character is, as a
/// JSON path (`email`, `profile.firstName`, `items[2]`); `None` if none does.
fn control_characters_at(value: &serde_json::Value) -> Option<String> {
    fn has_control(s: &str) -> bool {
        s.chars().any(char::is_control)
    }
    fn at(value: &serde_json::Value, path: &mut String) -> bool {
        match value {
            serde_json::Value::String(s) => has_control(s),
            serde_json::Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = at(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            serde_json::Value::Object(fields) => fields.iter().any(|(key, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                if has_control(key) {
                    path.push_str("a field name");
                    return true;
                }
                path.push_str(key);
                let found = at(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = String::new();
    at(value, &mut path).then(|| if path.is_empty() { "the body".to_string() } else { path })
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejection is an [`ApiError`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` whose rejection is an [`ApiError`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{Request, StatusCode, header};
    use proptest::prelude::*;

    #[derive(serde::Deserialize, Serialize, Debug)]
    struct Form {
        email: String,
        #[serde(default)]
        profile: Option<serde_json::Value>,
    }

    async fn extract(body: &str) -> Result<Json<Form>, ApiError> {
        let req = Request::post("/")
            .header(header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        Json::<Form>::from_request(req, &()).await
    }

    #[tokio::test]
    async fn nul_and_other_control_characters_are_a_422_naming_the_field() {
        for (body, field) in [
            (r#"{"email":"a\u0000b@example.com"}"#, "email"),
            (r#"{"email":"a\u0007b@example.com"}"#, "email"),
            (r#"{"email":"a\nb"}"#, "email"),
            (r#"{"email":"a\u009fb"}"#, "email"),
            (r#"{"email":"a","profile":{"firstName":"x\u001by"}}"#, "profile.firstName"),
            (r#"{"email":"a","profile":{"tags":["ok","b\u0000"]}}"#, "profile.tags[1]"),
            (r#"{"email":"a","profile":{"x\u0000":1}}"#, "profile.a field name"),
        ] {
            let e = extract(body).await.expect_err(body);
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert!(
                e.message.contains(&format!("{field} must not contain control characters")),
                "{body}: {}",
                e.message
            );
        }
    }

    #[tokio::test]
    async fn fields_the_type_does_not_have_are_ignored_as_the_schemas_allow() {
        let Json(form) = extract(r#"{"email":"a","x\u0000":"\u0000"}"#).await.unwrap();
        assert_eq!(form.email, "a");
    }

    #[tokio::test]
    async fn printable_unicode_passes() {
        let Json(form) = extract(r#"{"email":"Ünïcödé ✓ 𝄞 \u00a0 tab-free"}"#).await.unwrap();
        assert!(form.email.contains('𝄞'));
    }

    proptest! {
        // Whatever a string holds, it reaches the handler only without
        // control characters.
        #[test]
        fn a_string_with_a_control_character_never_passes(prefix in ".{0,20}", c in prop::char::range('\u{0}', '\u{9f}'), suffix in ".{0,20}") {
            let text = format!("{prefix}{c}{suffix}");
            let body = serde_json::json!({"email": text}).to_string();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            match rt.block_on(extract(&body)) {
                Ok(Json(form)) => prop_assert!(!form.email.chars().any(char::is_control)),
                Err(e) => {
                    prop_assert!(text.chars().any(char::is_control));
                    prop_assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
                }
            }
        }
    }
}
