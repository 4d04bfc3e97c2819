//! JSON bodies of the public REST API (`shared/seed/public-api.yaml`), shared by
//! the services that serve them and the tests that call them.

use crate::money::{Money, serialize_decimal};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The seed's `Error`: every error response of every service has this body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// The HTTP status code.
    #[schema(format = Int32)]
    pub code: u16,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[schema(read_only)]
    pub id: Uuid,
    #[schema(read_only, format = Email)]
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Register {
    #[schema(format = Email, max_length = 254, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub email: String,
    #[schema(min_length = 8, max_length = 128, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub password: String,
    #[serde(flatten)]
    pub profile: Profile,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]

pub struct Login {
    #[schema(format = Email, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub email: String,
    #[schema(pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub password: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessToken {
    pub access_token: String,
}

/// The editable part of a user, given at registration and by
/// `PUT /identity/profile` (where the seed sends a whole `User`: `id` and
/// `email` are read-only there and ignored when present). An empty string
/// clears a field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    #[serde(default)]
    #[schema(max_length = 100, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub first_name: Option<String>,
    #[serde(default)]
    #[schema(max_length = 100, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub last_name: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"^(\+?[0-9][0-9 ().-]{3,31})?$", example = "+71004242424")]
    pub phone: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Succeeded,
    Failed,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Succeeded => "succeeded",
            OrderStatus::Failed => "failed",
        }
    }
}

impl std::str::FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(OrderStatus::Pending),
            "succeeded" => Ok(OrderStatus::Succeeded),
            "failed" => Ok(OrderStatus::Failed),
            other => Err(format!("unknown order status {other:?}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    #[schema(read_only)]
    pub id: Uuid,
    pub price: Money,
    pub status: OrderStatus,
    /// Why a failed order failed (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[schema(read_only)]
    pub created_at: DateTime<Utc>,
    #[schema(read_only)]
    pub updated_at: DateTime<Utc>,
}

/// `POST /ordering/orders`: the seed's `Order` with only `price` writable.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateOrder {
    pub price: Money,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BillingAccount {
    #[serde(serialize_with = "serialize_decimal")]
    #[schema(value_type = f64, minimum = 0, multiple_of = 0.01)]
    pub amount: Decimal,
    #[schema(read_only)]
    pub created_at: DateTime<Utc>,
    #[schema(read_only)]
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]

pub struct BillingUpdate {
    pub amount: Money,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    #[schema(read_only)]
    pub id: Uuid,
    pub message: String,
    #[schema(read_only)]
    pub created_at: DateTime<Utc>,
}

/// The claims of an access token (an EdDSA-signed JWT issued by identity).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenClaims {
    pub iss: String,
    pub sub: String,
    pub user_id: Uuid,
    pub email: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: Uuid,
}

pub const TOKEN_ISSUER: &str = "order-system";
pub const TOKEN_COOKIE: &str = "accessToken";
