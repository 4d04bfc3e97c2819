//! Contact details parsed once, at the edge ("parse, don't validate"): an
//! [`Email`] or a [`Phone`] that exists is valid. Registration and the mailer
//! share [`Email::parse`], so an address that is accepted can be mailed to.

use std::fmt;
use std::str::FromStr;

use crate::ApiError;

/// Why a contact detail was refused; the text is the client's 422 message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContactError {
    Email,
    Phone,
}

impl fmt::Display for ContactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContactError::Email => "email is not a valid e-mail address",
            ContactError::Phone => "phone must be a phone number such as +71004242424",
        })
    }
}

impl std::error::Error for ContactError {}

impl From<ContactError> for ApiError {
    fn from(e: ContactError) -> Self {
        ApiError::unprocessable(e.to_string())
    }
}

/// An e-mail address the mailer can send to, and that sends nowhere
/// unexpected: what `lettre` accepts as an address (RFC 5321 syntax), with a
/// domain name of at least two labels (no address literal such as
/// `[127.0.0.1]`, no single-label name such as `localhost`, no all-numeric
/// top label such as `1.2.3.4`: a mailer that delivers directly would connect
/// where they point), within RFC 5321's lengths (local part 64 octets, each
/// domain label 63, the address 254), surrounding spaces removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(lettre::Address);

impl Email {
    pub const MAX_LEN: usize = 254;
    pub const MAX_LOCAL_LEN: usize = 64;
    pub const MAX_LABEL_LEN: usize = 63;

    pub fn parse(raw: &str) -> Result<Email, ContactError> {
        let raw = raw.trim();
        if raw.len() > Self::MAX_LEN {
            return Err(ContactError::Email);
        }
        let address = raw.parse::<lettre::Address>().map_err(|_| ContactError::Email)?;
        let labels: Vec<&str> = address.domain().split('.').collect();
        let named_host = labels.len() >= 2
            && labels.iter().all(|l| !l.is_empty() && l.len() <= Self::MAX_LABEL_LEN && !l.starts_with('['))
            && !labels.last().is_some_and(|top| top.chars().all(|c| c.is_ascii_digit()));
        if address.user().len() > Self::MAX_LOCAL_LEN || !named_host {
            return Err(ContactError::Email);
        }
        Ok(Email(address))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }

    /// The address for a `lettre` mailbox.
    pub fn address(&self) -> &lettre::Address {
        &self.0
    }
}

impl FromStr for Email {
    type Err = ContactError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Email::parse(s)
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Email> for String {
    fn from(e: Email) -> String {
        e.as_str().to_string()
    }
}

/// A phone number as the API's pattern says: an optional `+`, a digit, then 3
/// to 31 digits, spaces, dots, dashes or parentheses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Phone(String);

impl Phone {
    pub fn parse(raw: &str) -> Result<Phone, ContactError> {
        let rest = raw.strip_prefix('+').unwrap_or(raw);
        let valid = rest.starts_with(|c: char| c.is_ascii_digit())
            && (4..=32).contains(&rest.len())
            && rest.chars().all(|c| c.is_ascii_digit() || " ().-".contains(c));
        if valid { Ok(Phone(raw.to_string())) } else { Err(ContactError::Phone) }
    }

    /// An optional phone field: absent or empty means none.
    pub fn parse_optional(raw: Option<String>) -> Result<Option<Phone>, ContactError> {
        raw.filter(|p| !p.is_empty()).map(|p| Phone::parse(&p)).transpose()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Phone> for String {
    fn from(p: Phone) -> String {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_ordinary_address_parses_and_keeps_its_text() {
        let e = Email::parse("  Someone@Example.com ").unwrap();
        assert_eq!(e.as_str(), "Someone@Example.com");
        assert_eq!(e.to_string(), "Someone@Example.com");
    }

    #[test]
    fn addresses_lettre_cannot_send_to_are_refused() {
        for bad in [
            "",
            "not-an-email",
            "@example.com",
            "a@",
            "a..b@example.com",
            ".a@example.com",
            "a.@example.com",
            "a b@example.com",
            "a@b@example.com",
            "a@exa mple.com",
            "a@-example.com",
            // Address literals, single-label and numeric domains.
            "x@[127.0.0.1]",
            "x@[IPv6:::1]",
            "a@localhost",
            "a@example",
            "a@127.0.0.1",
            "a@example.com.",
            "a\u{0}b@example.com",
            "a\u{7}b@example.com",
        ] {
            assert_eq!(Email::parse(bad), Err(ContactError::Email), "{bad:?}");
        }
    }

    #[test]
    fn the_mailer_accepts_every_address_registration_accepts() {
        for good in
            ["a@example.com", "first.last+tag@sub.example.co.uk", "o'neil@example.org", "a@xn--bcher-kva.example"]
        {
            let e = Email::parse(good).unwrap();
            let mailbox = lettre::message::Mailbox::new(None, e.address().clone());
            assert!(mailbox.to_string().contains(e.as_str()), "{good}");
        }
    }

    #[test]
    fn an_address_longer_than_254_characters_is_refused() {
        let long = format!("{}@example.com", "a".repeat(64)) + &".example".repeat(25);
        assert!(long.len() > Email::MAX_LEN);
        assert_eq!(Email::parse(&long), Err(ContactError::Email));
    }

    #[test]
    fn rfc_5321_lengths_are_kept() {
        let local = |n: usize| format!("{}@example.com", "a".repeat(n));
        assert!(Email::parse(&local(Email::MAX_LOCAL_LEN)).is_ok());
        assert_eq!(Email::parse(&local(Email::MAX_LOCAL_LEN + 1)), Err(ContactError::Email));
        let label = |n: usize| format!("a@{}.example.com", "b".repeat(n));
        assert!(Email::parse(&label(Email::MAX_LABEL_LEN)).is_ok());
        assert_eq!(Email::parse(&label(Email::MAX_LABEL_LEN + 1)), Err(ContactError::Email));
        // 254 characters in all is the most a path of 256 octets holds.
        let domain = format!("{}.com", vec!["c".repeat(61); 3].join("."));
        let at_most = format!("{}@{domain}", "a".repeat(Email::MAX_LOCAL_LEN));
        assert_eq!(at_most.len(), Email::MAX_LEN);
        assert!(Email::parse(&at_most).is_ok());
        let over = format!("{}@d.{domain}", "a".repeat(Email::MAX_LOCAL_LEN));
        assert_eq!(Email::parse(&over), Err(ContactError::Email));
    }

    #[test]
    fn a_refused_contact_detail_is_a_422_with_a_message() {
        let e = ApiError::from(ContactError::Email);
        assert_eq!(e.status, axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.contains("e-mail"));
        assert!(ApiError::from(ContactError::Phone).message.contains("phone"));
    }

    #[test]
    fn phone_numbers_in_the_usual_forms_parse() {
        for good in ["+71004242424", "1004", "+1 (555) 010-9999", "8.800.555.35.35"] {
            assert_eq!(Phone::parse(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn phone_numbers_out_of_the_pattern_are_refused() {
        for bad in ["", "+", "123", "+-1234", "(555) 0101", "12345a", "+12345678901234567890123456789012345", "++1234"]
        {
            assert_eq!(Phone::parse(bad), Err(ContactError::Phone), "{bad:?}");
        }
    }

    #[test]
    fn an_empty_or_absent_phone_is_none() {
        assert_eq!(Phone::parse_optional(None), Ok(None));
        assert_eq!(Phone::parse_optional(Some(String::new())), Ok(None));
        assert!(Phone::parse_optional(Some("+7 100".into())).unwrap().is_some());
    }

    proptest! {
        // Any text either is an address lettre takes (and then the same text,
        // trimmed) or is refused with the 422 message: never a panic.
        #[test]
        fn any_string_parses_as_an_address_or_is_refused(raw in ".{0,300}") {
            match Email::parse(&raw) {
                Ok(e) => {
                    prop_assert_eq!(e.as_str(), raw.trim());
                    prop_assert!(e.as_str().parse::<lettre::Address>().is_ok());
                }
                Err(e) => prop_assert_eq!(e, ContactError::Email),
            }
        }

        #[test]
        fn generated_addresses_parse(user in "[a-z0-9]{1,20}([.+_-][a-z0-9]{1,10}){0,2}", host in "[a-z][a-z0-9]{0,15}", tld in "[a-z]{2,6}") {
            let raw = format!("{user}@{host}.{tld}");
            let email = Email::parse(&raw).unwrap();
            prop_assert_eq!(email.as_str(), raw.as_str());
        }

        #[test]
        fn any_string_parses_as_a_phone_or_is_refused(raw in ".{0,40}") {
            match Phone::parse(&raw) {
                Ok(p) => {
                    let rest = p.as_str().trim_start_matches('+');
                    prop_assert!(rest.starts_with(|c: char| c.is_ascii_digit()));
                }
                Err(e) => prop_assert_eq!(e, ContactError::Phone),
            }
        }
    }
}
