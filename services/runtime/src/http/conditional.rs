//! Conditional requests (RFC 9110 §13) and the `Prefer: wait` preference
//! (RFC 7240): entity tags, `If-None-Match` → 304, `If-Match` → 412, the
//! longest wait a long poll may ask for, and the memory of final tags that
//! answers a 304 without reading anything.

use axum::http::header::{CACHE_CONTROL, ETAG, IF_MATCH, IF_NONE_MATCH};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::RwLock;
use std::time::Duration;

use crate::ApiError;

/// The longest `Prefer: wait` honoured. Anything that times requests out
/// (the gateway's upstream timeout, a service's request timeout) must give a
/// request that asks to wait this much more room ([`prefer_wait`] says how
/// much); and a limit on requests in flight must leave room for waiting long
/// polls, which hold no database connection and cost a few KiB each.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

pub const PREFER: HeaderName = HeaderName::from_static("prefer");
pub const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// `private, no-cache`: a browser may keep the representation but must
/// revalidate it (cheaply, with `If-None-Match`) before every use.
pub const REVALIDATE: HeaderValue = HeaderValue::from_static("private, no-cache");

/// Set by a service on its answer (200 or 304) when the representation will
/// never change again (a settled order): its tag is final. The gateway
/// remembers the tag for the user and the path and answers that user's
/// conditional GETs naming it itself (after checking the user's token, as
/// for any request); it never passes the header on to the client.
pub const FINAL: HeaderName = HeaderName::from_static("x-final-representation");

/// Final tags (of representations that never change again), by a key that
/// names the resource and the user it was served to: a conditional GET of
/// that user naming the tag is answered 304 from here, without reading the
/// resource again. Another user's key is another entry, so nothing learnt
/// for one user answers another. Bounded: past its capacity, the entry
/// remembered first is forgotten (and read again when asked for).
pub struct FinalTags<K> {
    capacity: usize,
    inner: RwLock<Remembered<K>>,
}

struct Remembered<K> {
    tags: HashMap<K, ETag>,
    /// In the order remembered: the first to forget.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone> FinalTags<K> {
    /// At most `capacity` tags (0: none).
    pub fn new(capacity: usize) -> Self {
        FinalTags { capacity, inner: RwLock::new(Remembered { tags: HashMap::new(), order: VecDeque::new() }) }
    }

    /// The final tag remembered for `key`.
    pub fn get(&self, key: &K) -> Option<ETag> {
        self.inner.read().expect("final tags lock").tags.get(key).cloned()
    }

    /// The 304 for a request whose `If-None-Match` names the final tag
    /// remembered for `key`; `None` when it does not (or none is).
    pub fn not_modified(&self, key: &K, headers: &HeaderMap) -> Option<Response> {
        if !headers.contains_key(IF_NONE_MATCH) {
            return None;
        }
        let tag = self.get(key)?;
        tag.none_match_hit(headers).then(|| not_modified(&tag))
    }

    /// Remembers `tag` as the final tag of `key`.
    pub fn insert(&self, key: K, tag: ETag) {
        if self.capacity == 0 {
            return;
        }
        let mut r = self.inner.write().expect("final tags lock");
        if r.tags.insert(key.clone(), tag).is_some() {
            return;
        }
        r.order.push_back(key);
        while r.tags.len() > self.capacity {
            let Some(oldest) = r.order.pop_front() else { break };
            r.tags.remove(&oldest);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("final tags lock").tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A strong entity tag, kept with its quotes (`"…"`), as it goes on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ETag(String);

impl ETag {
    /// The tag whose opaque part is `opaque` (visible ASCII without `"`).
    pub fn new(opaque: impl std::fmt::Display) -> Self {
        let opaque = opaque.to_string();
        debug_assert!(opaque.bytes().all(|b| b.is_ascii_graphic() && b != b'"'), "{opaque:?}");
        ETag(format!("\"{opaque}\""))
    }

    /// The tag of a representation: a 64-bit FNV-1a hash of its bytes
    /// (stable across processes and builds, so every replica agrees).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        ETag::new(format!("{hash:016x}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tag a response carries in its `ETag` header, if a valid one.
    pub fn of_response(headers: &HeaderMap) -> Option<Self> {
        let v = headers.get(ETAG)?.to_str().ok()?;
        let opaque = v.strip_prefix('"')?.strip_suffix('"')?;
        opaque.bytes().all(|b| b.is_ascii_graphic() && b != b'"').then(|| ETag(v.to_string()))
    }

    fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.0).expect("visible ASCII")
    }

    /// Whether `If-None-Match` names this tag (weak comparison, `*` included):
    /// the client's copy is current.
    pub fn none_match_hit(&self, headers: &HeaderMap) -> bool {
        let opaque = &self.0;
        headers.get_all(IF_NONE_MATCH).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.trim() == "*" || entity_tags(v).any(|t| t.strip_prefix("W/").unwrap_or(t) == opaque))
        })
    }

    /// `None` without `If-Match`; otherwise whether it names this tag (strong
    /// comparison: a weak tag never matches) or is `*`.
    pub fn if_match(&self, headers: &HeaderMap) -> Option<bool> {
        let mut values = headers.get_all(IF_MATCH).iter().peekable();
        values.peek()?;
        Some(values.any(|v| v.to_str().is_ok_and(|v| v.trim() == "*" || entity_tags(v).any(|t| t == self.0))))
    }
}

impl std::fmt::Display for ETag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The entity tags of a list such as `"a", W/"b"` (with their quotes).
fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        loop {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                return None;
            }
            let start = rest;
            let body = rest.strip_prefix("W/").unwrap_or(rest);
            let Some(inner) = body.strip_prefix('"') else {
                // Not a tag: skip to the next comma.
                rest = rest.find(',').map_or("", |i| &rest[i..]);
                continue;
            };
            let Some(close) = inner.find('"') else {
                rest = "";
                return None;
            };
            let len = (start.len() - inner.len()) + close + 1;
            let tag = &start[..len];
            rest = &start[len..];
            return Some(tag);
        }
    })
}

/// A JSON representation with its tag and `Cache-Control: private, no-cache`,
/// or `304 Not Modified` (no body) when the request's `If-None-Match` names
/// the tag. Without `tag`, the tag is the hash of the body.
pub fn json_or_not_modified<T: Serialize>(
    headers: &HeaderMap,
    tag: Option<ETag>,
    body: &T,
) -> Result<(ETag, Response), ApiError> {
    let bytes = serde_json::to_vec(body).map_err(ApiError::internal)?;
    let tag = tag.unwrap_or_else(|| ETag::of_bytes(&bytes));
    if tag.none_match_hit(headers) {
        return Ok((tag.clone(), not_modified(&tag)));
    }
    let mut resp =
        ([(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response();
    resp.headers_mut().insert(ETAG, tag.header_value());
    resp.headers_mut().insert(CACHE_CONTROL, REVALIDATE);
    Ok((tag, resp))
}

/// `304 Not Modified` with the tag (and the caching rule the 200 has).
pub fn not_modified(tag: &ETag) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    resp.headers_mut().insert(ETAG, tag.header_value());
    resp.headers_mut().insert(CACHE_CONTROL, REVALIDATE);
    resp
}

/// The tag [`json_or_not_modified`] gives `body` without a tag of its own.
pub fn tag_of<T: Serialize>(body: &T) -> Result<ETag, ApiError> {
    Ok(ETag::of_bytes(&serde_json::to_vec(body).map_err(ApiError::internal)?))
}

/// The `wait` of the request's `Prefer` header(s) (RFC 7240), capped at
/// [`MAX_WAIT`]; `None` when absent or not a number of seconds (a preference
/// a server does not understand is ignored, not refused).
pub fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers.get_all(PREFER).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).find_map(|pref| {
        let pref = pref.split(';').next()?.trim();
        let (name, value) = pref.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("wait") {
            return None;
        }
        let secs: u64 = value.trim().trim_matches('"').parse().ok()?;
        Some(Duration::from_secs(secs).min(MAX_WAIT))
    })
}

/// `Preference-Applied: wait=N`.
pub fn preference_applied(wait: Duration) -> (HeaderName, HeaderValue) {
    (PREFERENCE_APPLIED, HeaderValue::from_str(&format!("wait={}", wait.as_secs())).expect("ASCII"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn if_none_match_weak_comparison_and_lists() {
        let tag = ETag::new("abc");
        assert!(tag.none_match_hit(&headers(&[("if-none-match", "\"abc\"")])));
        assert!(tag.none_match_hit(&headers(&[("if-none-match", "\"x\", W/\"abc\"")])));
        assert!(tag.none_match_hit(&headers(&[("if-none-match", "*")])));
        assert!(!tag.none_match_hit(&headers(&[("if-none-match", "\"abcd\"")])));
        assert!(!tag.none_match_hit(&headers(&[("if-none-match", "abc")])));
        assert!(!tag.none_match_hit(&headers(&[("if-none-match", "\"abc")])));
        assert!(!tag.none_match_hit(&HeaderMap::new()));
    }

    #[test]
    fn if_match_strong_comparison() {
        let tag = ETag::new("v1");
        assert_eq!(tag.if_match(&HeaderMap::new()), None);
        assert_eq!(tag.if_match(&headers(&[("if-match", "\"v1\"")])), Some(true));
        assert_eq!(tag.if_match(&headers(&[("if-match", "W/\"v1\"")])), Some(false));
        assert_eq!(tag.if_match(&headers(&[("if-match", "\"v0\"")])), Some(false));
        assert_eq!(tag.if_match(&headers(&[("if-match", "garbage")])), Some(false));
        assert_eq!(tag.if_match(&headers(&[("if-match", "*")])), Some(true));
    }

    #[test]
    fn prefer_wait_parsed_and_capped() {
        assert_eq!(prefer_wait(&headers(&[("prefer", "wait=5")])), Some(Duration::from_secs(5)));
        assert_eq!(prefer_wait(&headers(&[("prefer", "respond-async, WAIT = 7")])), Some(Duration::from_secs(7)));
        assert_eq!(prefer_wait(&headers(&[("prefer", "wait=3600")])), Some(MAX_WAIT));
        assert_eq!(prefer_wait(&headers(&[("prefer", "wait=soon")])), None);
        assert_eq!(prefer_wait(&headers(&[("prefer", "return=minimal")])), None);
        assert_eq!(prefer_wait(&HeaderMap::new()), None);
    }

    #[test]
    fn final_tags_are_per_key_bounded_and_answer_only_the_tag_they_know() {
        let tags = FinalTags::new(2);
        tags.insert(("a", "alice"), ETag::new("a"));
        assert_eq!(tags.get(&("a", "alice")), Some(ETag::new("a")));
        assert_eq!(tags.get(&("a", "bob")), None, "another user's key is another entry");
        let hit = tags.not_modified(&("a", "alice"), &headers(&[("if-none-match", "\"a\"")])).expect("304");
        assert_eq!((hit.status(), hit.headers()[ETAG].to_str().unwrap()), (StatusCode::NOT_MODIFIED, "\"a\""));
        assert!(tags.not_modified(&("a", "alice"), &headers(&[("if-none-match", "\"b\"")])).is_none());
        assert!(tags.not_modified(&("a", "alice"), &HeaderMap::new()).is_none());
        assert!(tags.not_modified(&("a", "bob"), &headers(&[("if-none-match", "\"a\"")])).is_none());
        tags.insert(("b", "alice"), ETag::new("b"));
        tags.insert(("b", "alice"), ETag::new("b"));
        assert_eq!(tags.len(), 2, "the same key again takes no more room");
        tags.insert(("c", "alice"), ETag::new("c"));
        assert_eq!((tags.len(), tags.get(&("a", "alice")), tags.get(&("c", "alice"))), (2, None, Some(ETag::new("c"))));
        let none = FinalTags::new(0);
        none.insert("a", ETag::new("a"));
        assert!(none.is_empty());
    }

    #[test]
    fn a_responses_tag_is_read_back_only_when_valid() {
        let tag = ETag::of_bytes(b"x");
        let mut h = HeaderMap::new();
        h.insert(ETAG, tag.header_value());
        assert_eq!(ETag::of_response(&h), Some(tag));
        for bad in ["W/\"x\"", "x", "\"a\"b\""] {
            h.insert(ETAG, HeaderValue::from_str(bad).unwrap());
            assert_eq!(ETag::of_response(&h), None, "{bad}");
        }
        assert_eq!(ETag::of_response(&HeaderMap::new()), None);
    }

    #[test]
    fn tags_of_bytes_differ_and_repeat() {
        assert_eq!(ETag::of_bytes(b"a"), ETag::of_bytes(b"a"));
        assert_ne!(ETag::of_bytes(b"a"), ETag::of_bytes(b"b"));
    }
}
