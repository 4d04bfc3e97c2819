//! Exact money: a decimal with at most two fraction digits, never a float.
//!
//! JSON carries money as a number (`600`, `12.5`), as the seed's schemas say.
//! Deserialisation goes through serde_json's `f64`, which is exact for the
//! values accepted here: at most [`Money::MAX`] (15 significant digits) with at
//! most two decimals, so the shortest representation of the parsed float is the
//! very text the client sent. Anything with more decimals, zero, negative or
//! too large is refused with a message a person understands.

use rust_decimal::Decimal;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A positive amount of money with at most two fraction digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(Decimal);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoneyError {
    NotPositive,
    TooManyDecimals,
    TooLarge,
}

impl fmt::Display for MoneyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MoneyError::NotPositive => "an amount must be greater than zero",
            MoneyError::TooManyDecimals => "an amount has at most two decimal places",
            MoneyError::TooLarge => "an amount must not exceed 999999999999.99",
        })
    }
}

impl std::error::Error for MoneyError {}

impl Money {
    /// The largest amount accepted anywhere (fits NUMERIC(14,2)).
    pub const MAX: Decimal = Decimal::from_parts(276_447_231, 23_283, 0, false, 2);

    pub fn new(value: Decimal) -> Result<Self, MoneyError> {
        if value <= Decimal::ZERO {
            return Err(MoneyError::NotPositive);
        }
        if value.normalize().scale() > 2 {
            return Err(MoneyError::TooManyDecimals);
        }
        if value > Self::MAX {
            return Err(MoneyError::TooLarge);
        }
        Ok(Money(value))
    }

    pub fn as_decimal(self) -> Decimal {
        self.0
    }
}

impl From<Money> for Decimal {
    fn from(m: Money) -> Decimal {
        m.0
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = Decimal::from_str(s).map_err(|_| MoneyError::TooLarge)?;
        Money::new(d)
    }
}

/// Shows the amount with exactly two decimals, as people read prices: `600.00`.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.0)
    }
}

/// Writes any decimal amount (a balance may be zero) as a JSON number.
pub fn serialize_decimal<S: Serializer>(value: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    let v = value.normalize();
    if v.scale() == 0
        && let Ok(i) = i64::try_from(v)
    {
        return s.serialize_i64(i);
    }
    // At most 15 significant digits: the shortest float representation is exact.
    let f: f64 = v.to_string().parse().map_err(serde::ser::Error::custom)?;
    s.serialize_f64(f)
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_decimal(&self.0, s)
    }
}

/// The JSON Schema of money, as the AsyncAPI document shows it: a JSON number,
/// positive, with at most two decimals, at most [`Money::MAX`].
#[cfg(feature = "asyncapi")]
impl schemars::JsonSchema for Money {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Money".into()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        "contracts::Money".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let max: f64 = Money::MAX.to_string().parse().expect("Money::MAX is a number");
        schemars::json_schema!({
            "description": "An exact amount of money: a JSON number (`600`, `12.5`), greater than zero, \
                with at most two decimal places. Kept as a decimal, never as a float, by every service.",
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": max,
            "multipleOf": 0.01,
            "examples": [600, 12.5]
        })
    }
}

struct MoneyVisitor;

impl Visitor<'_> for MoneyVisitor {
    type Value = Money;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a positive number with at most two decimal places")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
        Money::new(Decimal::from(v)).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
        Money::new(Decimal::from(v)).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
        if !v.is_finite() || v.abs() > 1e15 {
            return Err(E::custom(MoneyError::TooLarge));
        }
        // Rust prints the shortest text that parses back to the same float.
        let d = Decimal::from_str(&v.to_string()).map_err(|_| E::custom(MoneyError::TooLarge))?;
        Money::new(d).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MoneyVisitor)
    }
}

/// In OpenAPI, money is a JSON number: positive, in cents.
impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .exclusive_minimum(Some(0.0))
            .maximum(Some(999_999_999_999.99))
            .multiple_of(Some(0.01))
            .description(Some("An amount of money: positive, at most two decimal places."))
            .examples([serde_json::json!(600)])
            .into()
    }
}

impl utoipa::ToSchema for Money {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Money, String> {
        serde_json::from_str::<Money>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_integers_and_two_decimals_exactly() {
        assert_eq!(parse("600").unwrap().to_string(), "600.00");
        assert_eq!(parse("12.5").unwrap().to_string(), "12.50");
        assert_eq!(parse("0.01").unwrap().to_string(), "0.01");
        assert_eq!(parse("0.1").unwrap().as_decimal(), Decimal::new(1, 1));
        assert_eq!(parse("999999999999.99").unwrap().as_decimal(), Money::MAX);
    }

    #[test]
    fn refuses_what_is_not_money() {
        assert!(parse("0").unwrap_err().contains("greater than zero"));
        assert!(parse("-5").unwrap_err().contains("greater than zero"));
        assert!(parse("1.234").unwrap_err().contains("two decimal places"));
        assert!(parse("1000000000000").unwrap_err().contains("must not exceed"));
        assert!(parse("1e300").unwrap_err().contains("must not exceed"));
        assert!(parse("\"10\"").unwrap_err().contains("positive number"));
        assert!(parse("null").is_err());
    }

    #[test]
    fn writes_json_numbers() {
        let m = |s: &str| s.parse::<Money>().unwrap();
        assert_eq!(serde_json::to_string(&m("600.00")).unwrap(), "600");
        assert_eq!(serde_json::to_string(&m("12.50")).unwrap(), "12.5");
        assert_eq!(serde_json::to_string(&m("0.07")).unwrap(), "0.07");
        assert_eq!(serde_json::to_string(&m("999999999999.99")).unwrap(), "999999999999.99");
    }

    #[test]
    fn text_parses_like_json_and_shows_two_decimals() {
        assert_eq!("7".parse::<Money>().unwrap().to_string(), "7.00");
        assert_eq!("0.5".parse::<Money>().unwrap().to_string(), "0.50");
        assert_eq!("abc".parse::<Money>(), Err(MoneyError::TooLarge));
        assert_eq!("0.00".parse::<Money>(), Err(MoneyError::NotPositive));
        assert_eq!("1.001".parse::<Money>(), Err(MoneyError::TooManyDecimals));
    }

    #[test]
    fn trailing_zeros_are_not_extra_decimals() {
        assert_eq!("1.500".parse::<Money>().unwrap().to_string(), "1.50");
    }

    #[test]
    fn order_statuses_read_back_what_they_write() {
        use crate::api::OrderStatus;
        for s in [OrderStatus::Pending, OrderStatus::Succeeded, OrderStatus::Failed] {
            assert_eq!(s.as_str().parse::<OrderStatus>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("PENDING".parse::<OrderStatus>().is_err());
    }

    proptest::proptest! {
        // Every amount the API accepts survives JSON unchanged.
        #[test]
        fn money_round_trips_through_json(cents in 1i64..=99_999_999_999_999) {
            let m = Money::new(Decimal::new(cents, 2)).unwrap();
            let json = serde_json::to_string(&m).unwrap();
            proptest::prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
            proptest::prop_assert_eq!(m.to_string().parse::<Money>().unwrap(), m);
        }

        // Any JSON number is money or a message, never a panic.
        #[test]
        fn any_number_is_money_or_refused(x in proptest::num::f64::ANY) {
            if let Ok(json) = serde_json::to_string(&x) {
                match serde_json::from_str::<Money>(&json) {
                    Ok(m) => proptest::prop_assert!(m.as_decimal() > Decimal::ZERO && m.as_decimal() <= Money::MAX),
                    Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
                }
            }
        }
    }
}
