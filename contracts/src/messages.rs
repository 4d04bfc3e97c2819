//! The messages of variant 4, named as in the seed's AsyncAPI sketch, in
//! camelCase JSON. Each type knows the exchange it is published to and its
//! routing key (its name), so publisher and consumer cannot disagree.

use crate::money::Money;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// A message that travels over RabbitMQ.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The message name: AMQP `type` property and routing key.
    const NAME: &'static str;
    /// The topic exchange of the context that publishes it.
    const EXCHANGE: &'static str;

    /// What ties the message to a business entity (order id, user id, ...):
    /// sent as the AMQP `correlation_id` and recorded in log spans.
    fn correlation_id(&self) -> String;
}

/// The payload field that a message sends as its AMQP `correlation_id` (its
/// Rust name; the JSON name is its camelCase): the AsyncAPI document points
/// its `correlationId` there.
#[cfg(feature = "asyncapi")]
pub trait CorrelationField: Message {
    const CORRELATION_FIELD: &'static str;
}

macro_rules! message {
    ($ty:ident, $exchange:expr, $corr:ident) => {
        impl Message for $ty {
            const NAME: &'static str = stringify!($ty);
            const EXCHANGE: &'static str = $exchange;
            fn correlation_id(&self) -> String {
                self.$corr.to_string()
            }
        }
        #[cfg(feature = "asyncapi")]
        impl CorrelationField for $ty {
            const CORRELATION_FIELD: &'static str = stringify!($corr);
        }
    };
}

pub mod exchange {
    pub const IDENTITY: &str = "identity";
    pub const BILLING: &str = "billing";
    pub const ORDERING: &str = "ordering";
    pub const NOTIFICATION: &str = "notification";
}

/// A user registered. Billing opens an account, notification keeps a profile copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct UserCreated {
    pub id: Uuid,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    /// The profile's version: 1 at registration, one more at every change. A
    /// copy of the profile applies an event only when it is not older than
    /// the one it holds, so an older event delivered or retried after a newer
    /// one changes nothing. (0 in events from before versions existed.)
    #[serde(default)]
    pub version: i64,
}
message!(UserCreated, exchange::IDENTITY, id);

/// A user changed their profile. Notification refreshes its copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct UserUpdated {
    pub id: Uuid,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    /// The profile's version: 1 at registration, one more at every change. A
    /// copy of the profile applies an event only when it is not older than
    /// the one it holds, so an older event delivered or retried after a newer
    /// one changes nothing. (0 in events from before versions existed.)
    #[serde(default)]
    pub version: i64,
}
message!(UserUpdated, exchange::IDENTITY, id);

/// A command to billing: charge `amount` to the user's account. Any service
/// may send it; the outcome carries the same `id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct CreatePayment {
    pub id: Uuid,
    pub user_id: Uuid,
    pub amount: Money,
}
message!(CreatePayment, exchange::ORDERING, id);

/// A command to billing: the payment `id` will not be needed any more, so it
/// must never be taken. Billing answers with the payment's outcome:
/// `PaymentCreated` when it was already charged (the payment stands), or
/// `PaymentFailed` — with [`PAYMENT_VOIDED`] when nothing had been taken; the
/// void is then recorded, and a `CreatePayment` of that id arriving later is
/// refused the same way. `userId` and `amount` are the payment's, as its
/// `CreatePayment` asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct VoidPayment {
    pub id: Uuid,
    pub user_id: Uuid,
    pub amount: Money,
}
message!(VoidPayment, exchange::ORDERING, id);

/// The payment `id` was charged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct PaymentCreated {
    pub id: Uuid,
}
message!(PaymentCreated, exchange::BILLING, id);

/// The payment `id` was refused, for `reason` (e.g. "not enough money").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct PaymentFailed {
    pub id: Uuid,
    /// Why, in words a person reads (e.g. "not enough money").
    pub reason: String,
}
message!(PaymentFailed, exchange::BILLING, id);

/// An order was paid for and is complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub price: Money,
    /// When the order was settled.
    pub occurred_at: DateTime<Utc>,
}
message!(OrderCreated, exchange::ORDERING, order_id);

/// An order could not be fulfilled, for `reason`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct OrderFailed {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub price: Money,
    /// Why, in words a person reads (e.g. "not enough money").
    pub reason: String,
    /// When the order was settled.
    pub occurred_at: DateTime<Utc>,
}
message!(OrderFailed, exchange::ORDERING, order_id);

/// A notification was stored for a user (`message`, the words the list and
/// the e-mail show). The push service streams it to the user's pages, so a
/// page shows it without asking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "asyncapi", derive(schemars::JsonSchema, asyncapi_rust::ToAsyncApiMessage))]
#[serde(rename_all = "camelCase")]
pub struct NotificationCreated {
    /// The notification's id, as `GET /notifications` lists it.
    pub id: Uuid,
    pub user_id: Uuid,
    /// The order it is about, if any.
    pub order_id: Option<Uuid>,
    pub message: String,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}
message!(NotificationCreated, exchange::NOTIFICATION, id);

/// The reason billing gives when the balance does not cover a payment.
pub const NOT_ENOUGH_MONEY: &str = "not enough money";

/// The reason billing gives for a payment voided before it was taken
/// (`VoidPayment`): no money was taken, and none will be.
pub const PAYMENT_VOIDED: &str = "payment not taken in time: voided";

/// A user as identity announces them, at registration and on every change,
/// with the version of the profile the event carries.
macro_rules! from_user {
    ($ty:ident) => {
        impl $ty {
            pub fn new(u: &crate::api::User, version: i64) -> Self {
                $ty {
                    id: u.id,
                    email: u.email.clone(),
                    first_name: u.first_name.clone(),
                    last_name: u.last_name.clone(),
                    phone: u.phone.clone(),
                    version,
                }
            }
        }
    };
}
from_user!(UserCreated);
from_user!(UserUpdated);
