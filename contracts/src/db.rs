//! Domain values as PostgreSQL values, so a query reads them typed: `Money`
//! is a NUMERIC that is checked again when read, `OrderStatus` a TEXT column
//! whose CHECK constraint lists the same three words.

use crate::Money;
use crate::api::OrderStatus;
use rust_decimal::Decimal;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

impl Type<Postgres> for Money {
    fn type_info() -> PgTypeInfo {
        <Decimal as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Money {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <Decimal as Encode<Postgres>>::encode_by_ref(&self.as_decimal(), buf)
    }
}

/// A stored amount that is not money (zero, three decimals) is an error, not a value.
impl Decode<'_, Postgres> for Money {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Money::new(<Decimal as Decode<Postgres>>::decode(value)?)?)
    }
}

impl Type<Postgres> for OrderStatus {
    fn type_info() -> PgTypeInfo {
        <&str as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for OrderStatus {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <&str as Encode<Postgres>>::encode_by_ref(&self.as_str(), buf)
    }
}

impl Decode<'_, Postgres> for OrderStatus {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Postgres>>::decode(value)?;
        text.parse().map_err(Into::into)
    }
}
