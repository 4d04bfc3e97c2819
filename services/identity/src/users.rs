//! Registration, login, logout and the user's profile.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use contracts::api::{AccessToken, ErrorBody, Login, Profile, Register, TOKEN_COOKIE, TOKEN_ISSUER, TokenClaims, User};
use contracts::messages::{UserCreated, UserUpdated};
use runtime::auth::CurrentUser;
use runtime::contact::{Email, Phone};
use runtime::http::responses::{NotAuthenticated, UnexpectedError};
use runtime::{ApiError, Json};
use uuid::Uuid;

use crate::throttle::ClientIp;
use crate::{AppState, OUTBOX, devices};

struct UserRow {
    id: Uuid,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    phone: Option<String>,
    /// The profile's version (see `UserUpdated::version`).
    version: i64,
}

impl From<UserRow> for User {
    fn from(r: UserRow) -> User {
        User { id: r.id, email: r.email, first_name: r.first_name, last_name: r.last_name, phone: r.phone }
    }
}

/// An e-mail address as people type it: one `@`, something on both sides,
/// a dot in the domain, no spaces. Deliverability is proven by the mail itself.
fn parse_password(p: &str) -> Result<&str, ApiError> {
    match p.chars().count() {
        n if n < 8 => Err(ApiError::unprocessable("password must have at least 8 characters")),
        n if n > 128 => Err(ApiError::unprocessable("password must have at most 128 characters")),
        _ => Ok(p),
    }
}

/// Optional free text: no control characters, trimmed, empty means absent,
/// at most `max` characters (the schema's `pattern` and `maxLength`).
fn parse_text(field: &str, value: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    let Some(v) = value else { return Ok(None) };
    if v.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(format!("{field} must not contain control characters")));
    }
    if v.chars().count() > max {
        return Err(ApiError::unprocessable(format!("{field} must have at most {max} characters")));
    }
    let v = v.trim();
    Ok((!v.is_empty()).then(|| v.to_string()))
}

/// The profile fields, each checked and cleaned.
fn parse_profile(p: Profile) -> Result<Profile, ApiError> {
    Ok(Profile {
        first_name: parse_text("firstName", p.first_name, 100)?,
        last_name: parse_text("lastName", p.last_name, 100)?,
        phone: Phone::parse_optional(p.phone)?.map(String::from),
    })
}

#[utoipa::path(post, path = "/api/v1/register", tag = "identity", operation_id = "registerUser", security(()),
    request_body = Register,
    responses(
        (status = 201, description = "Registered", body = User),
        (status = 409, description = "The e-mail is already registered", body = ErrorBody),
        (status = 422, description = "Invalid e-mail, password or profile field", body = ErrorBody),
        (status = 429, description = "Too many registrations from this address", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Too busy checking passwords", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        UnexpectedError,
    ))]
pub async fn register(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    Json(form): Json<Register>,
) -> Result<Response, ApiError> {
    state.throttle.register(client)?;
    let email = String::from(Email::parse(&form.email)?);
    let password = parse_password(&form.password)?.to_string();
    let Profile { first_name, last_name, phone } = parse_profile(form.profile)?;
    let hash = state.passwords.hash(password).await?;
    let id = Uuid::now_v7();

    let mut tx = state.db.begin().await?;
    let inserted = sqlx::query!(
        "INSERT INTO users (id, email, password_hash, first_name, last_name, phone)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        id,
        &email,
        &hash,
        first_name.as_deref(),
        last_name.as_deref(),
        phone.as_deref(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(ApiError::conflict("a user with this e-mail is already registered"));
    }
    let user = User { id, email, first_name, last_name, phone };
    OUTBOX.enqueue(&mut tx, &UserCreated::new(&user, 1)).await?; // the column's default
    tx.commit().await?;
    tracing::info!(user_id = %id, "user registered");
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

fn cookie(state: &AppState, value: &str, max_age: u64) -> HeaderValue {
    let secure = if state.cookie_secure { "; Secure" } else { "" };
    let c = format!("{TOKEN_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&c).expect("cookie is ASCII")
}

#[utoipa::path(post, path = "/api/v1/login", tag = "identity", operation_id = "loginUser", security(()),
    request_body = Login,
    responses(
        (status = 200, description = "The access token (also set as the `accessToken` cookie)", body = AccessToken,
            headers(("Set-Cookie" = String, description = "accessToken=<JWT>; HttpOnly; SameSite=Strict, and, for a \
                client without one for this account, a `deviceToken` cookie: later logins from this client count \
                against its own limit instead of the account's"))),
        (status = 401, description = "Wrong e-mail or password", body = ErrorBody),
        (status = 429, description = "Too many login attempts from this address, for this account (from clients \
                                      without its device cookie) or from this device", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Too busy checking passwords", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        UnexpectedError,
    ))]
pub async fn login(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    Json(form): Json<Login>,
) -> Result<Response, ApiError> {
    let device = state.device_cookie_ttl.and_then(|_| devices::from_headers(&headers, &state.keys(), &form.email));
    state.throttle.login(client, &form.email, device.as_deref())?;
    let row: Option<(Uuid, String, String)> =
        sqlx::query!("SELECT id, email, password_hash FROM users WHERE lower(email) = lower($1)", form.email.trim())
            .fetch_optional(&state.db)
            .await?
            .map(|r| (r.id, r.email, r.password_hash));
    let (hash, user) = match row {
        Some((id, email, hash)) => (Some(hash), Some((id, email))),
        None => (None, None),
    };
    let valid = state.passwords.verify(form.password, hash).await?;
    let (Some((id, email)), true) = (user, valid) else {
        return Err(ApiError::unauthorized("wrong e-mail or password"));
    };
    let now = Utc::now().timestamp();
    let ttl = state.token_ttl.as_secs();
    let claims = TokenClaims {
        iss: TOKEN_ISSUER.into(),
        sub: id.to_string(),
        user_id: id,
        email,
        iat: now,
        exp: now + ttl as i64,
        jti: Uuid::new_v4(),
    };
    let keys = state.keys();
    let token = keys.current.sign(&claims)?;
    tracing::info!(user_id = %id, known_device = device.is_some(), "logged in");
    let mut resp = Json(AccessToken { access_token: token.clone() }).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie(&state, &token, ttl));
    if let (None, Some(device_ttl)) = (&device, state.device_cookie_ttl) {
        let value = devices::issue(&keys.current, &claims.email, device_ttl);
        resp.headers_mut().append(header::SET_COOKIE, devices::set_cookie(&value, device_ttl, state.cookie_secure));
    }
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Ends the token the gateway authenticated this call with.
#[utoipa::path(post, path = "/api/v1/logout", tag = "identity", operation_id = "logoutUser",
    responses(
        (status = 204, description = "Logout succeeded; the token is no longer accepted"),
        NotAuthenticated,
    ))]
pub async fn logout(State(state): State<AppState>, user: CurrentUser) -> Result<Response, ApiError> {
    // The token the gateway's assertion names (its `jti` and `exp`).
    let expires = DateTime::<Utc>::from_timestamp(user.token_expires, 0)
        .ok_or_else(|| ApiError::bad_request("the token's expiry is out of range"))?;
    sqlx::query!(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        user.token_id,
        expires
    )
    .execute(&state.db)
    .await?;
    tracing::info!(user_id = %user.id, "logged out");
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie(&state, "", 0));
    Ok(resp)
}

async fn find_user(state: &AppState, id: Uuid) -> Result<User, ApiError> {
    let row: Option<UserRow> = sqlx::query_as!(
        UserRow,
        "SELECT id, email, first_name, last_name, phone, version FROM users WHERE id = $1",
        id
    )
    .fetch_optional(&state.db)
    .await?;
    row.map(User::from).ok_or_else(|| ApiError::not_found("user not found"))
}

#[utoipa::path(get, path = "/api/v1/profile", tag = "identity", operation_id = "getCurrentUser",
    responses(
        (status = 200, description = "The current user", body = User),
        NotAuthenticated,
        UnexpectedError,
    ))]
pub async fn profile(State(state): State<AppState>, user: CurrentUser) -> Result<Json<User>, ApiError> {
    Ok(Json(find_user(&state, user.id).await?))
}

#[utoipa::path(put, path = "/api/v1/profile", tag = "identity", operation_id = "updateCurrentUser",
    request_body = Profile,
    responses(
        (status = 200, description = "The updated user", body = User),
        NotAuthenticated,
        (status = 422, description = "Invalid profile field", body = ErrorBody),
        UnexpectedError,
    ))]
pub async fn update_profile(
    State(state): State<AppState>,
    user: CurrentUser,
    Json(form): Json<Profile>,
) -> Result<Json<User>, ApiError> {
    let Profile { first_name, last_name, phone } = parse_profile(form)?;
    let mut tx = state.db.begin().await?;
    let row: Option<UserRow> = sqlx::query_as!(
        UserRow,
        "UPDATE users SET first_name = $2, last_name = $3, phone = $4, updated_at = now(), version = version + 1
         WHERE id = $1 RETURNING id, email, first_name, last_name, phone, version",
        user.id,
        first_name.as_deref(),
        last_name.as_deref(),
        phone.as_deref(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or_else(|| ApiError::not_found("user not found"))?;
    let version = row.version;
    let user = User::from(row);
    OUTBOX.enqueue(&mut tx, &UserUpdated::new(&user, version)).await?;
    tx.commit().await?;
    Ok(Json(user))
}
