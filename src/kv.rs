//! The key operations every layer shares (leaf module): what a request asks of a key's
//! owner, what the owner did, and the checks an owner applies to whatever it is asked to
//! store, whether the request came from a client or from another node.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Keys longer than this many characters are refused (PUT) or cannot exist (GET, DELETE).
pub const MAX_KEY_CHARS: usize = 50;

/// A key operation, as executed by the key's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    Get,
    /// The raw JSON text of the value.
    Put(Bytes),
    Delete,
}

impl KvOp {
    pub fn is_write(&self) -> bool {
        !matches!(self, KvOp::Get)
    }
}

/// The HTTP method of a course key request; names the `message` of its errors (and, in
/// the replicated mode, travels to the replica that validates the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvMethod {
    Get,
    Put,
    Delete,
}

impl KvMethod {
    pub fn parse(method: &warp::http::Method) -> Option<KvMethod> {
        match method.as_str() {
            "GET" => Some(KvMethod::Get),
            "PUT" => Some(KvMethod::Put),
            "DELETE" => Some(KvMethod::Delete),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvMethod::Get => "GET",
            KvMethod::Put => "PUT",
            KvMethod::Delete => "DELETE",
        }
    }
}

/// What the owner did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOutcome {
    Found(Bytes),
    Absent,
    Added,
    Replaced,
    Deleted,
}

impl KvOutcome {
    /// Whether the operation wrote something (stored or deleted a value).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            KvOutcome::Added | KvOutcome::Replaced | KvOutcome::Deleted
        )
    }
}

/// Why an owner refuses to store a key or value that reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Invalid {
    #[error("Key is too long")]
    KeyTooLong,
    #[error("Value is missing")]
    ValueMissing,
    #[error("Invalid JSON")]
    NotJson,
}

/// Whether `key` may exist at all.
pub fn key_fits(key: &str) -> bool {
    // A character is at least a byte: most keys need no counting.
    key.len() <= MAX_KEY_CHARS || key.chars().count() <= MAX_KEY_CHARS
}

/// The owner's check of an operation that arrived from another node: the same rules as
/// the public API (a key of at most [`MAX_KEY_CHARS`] characters, a value that is one JSON
/// value other than `null`), so nothing reaches the store that a client could not store.
pub fn check(key: &str, op: &KvOp) -> Result<(), Invalid> {
    match op {
        KvOp::Put(value) => check_write(key, Some(value)),
        _ => Ok(()),
    }
}

/// The same rules for a write a peer hands over (a view change's batch): `value`, or a
/// deletion (`None`), whose key must fit all the same.
pub fn check_write(key: &str, value: Option<&[u8]>) -> Result<(), Invalid> {
    if !key_fits(key) {
        return Err(Invalid::KeyTooLong);
    }
    value.map_or(Ok(()), check_value)
}

/// A stored value is exactly one JSON value, not `null`.
pub fn check_value(value: &[u8]) -> Result<(), Invalid> {
    if is_plain_string(value) {
        return Ok(());
    }
    let parsed: &serde_json::value::RawValue =
        serde_json::from_slice(value).map_err(|_| Invalid::NotJson)?;
    if parsed.get() == "null" {
        return Err(Invalid::ValueMissing);
    }
    Ok(())
}

/// Whether `value` is a JSON string of printable ASCII without escapes, the common value,
/// told by one pass over its bytes (a JSON parser takes several times as long).
fn is_plain_string(value: &[u8]) -> bool {
    match value {
        [b'"', inner @ .., b'"'] => inner
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_refuse_what_a_client_could_not_store() {
        let put = |v: &'static str| KvOp::Put(Bytes::from_static(v.as_bytes()));
        assert_eq!(check("k", &put(r#"{"a":[1,2]}"#)), Ok(()));
        assert_eq!(check("k", &put(" 7 ")), Ok(()));
        assert_eq!(check("k", &put("<html>")), Err(Invalid::NotJson));
        assert_eq!(check("k", &put("1 2")), Err(Invalid::NotJson));
        assert_eq!(check("k", &put("null")), Err(Invalid::ValueMissing));
        assert_eq!(check(&"k".repeat(51), &put("1")), Err(Invalid::KeyTooLong));
        assert_eq!(check(&"é".repeat(50), &put("1")), Ok(()));
        assert_eq!(check(&"k".repeat(51), &KvOp::Get), Ok(()));
        assert_eq!(
            check(&"é".repeat(26), &put("1")),
            Ok(()),
            "52 bytes, 26 characters"
        );
        assert_eq!(check(&"é".repeat(51), &put("1")), Err(Invalid::KeyTooLong));
    }

    #[test]
    fn plain_strings_pass_without_the_parser_and_the_rest_go_through_it() {
        for plain in [r#""""#, r#""abc 123""#, r#""~ !""#] {
            assert!(is_plain_string(plain.as_bytes()), "{plain}");
            assert_eq!(check_value(plain.as_bytes()), Ok(()));
        }
        // Not plain: each is told by the parser, valid or not.
        for (value, expected) in [
            (r#""a\"b""#, Ok(())),
            ("\"é\"", Ok(())),
            (r#" "a" "#, Ok(())),
            (r#""a"b""#, Err(Invalid::NotJson)),
            (r#""a\""#, Err(Invalid::NotJson)),
            ("\"a\tb\"", Err(Invalid::NotJson)),
            (r#"""#, Err(Invalid::NotJson)),
        ] {
            assert!(!is_plain_string(value.as_bytes()), "{value}");
            assert_eq!(check_value(value.as_bytes()), expected, "{value}");
        }
        assert_eq!(check_value(b"\"\xff\""), Err(Invalid::NotJson), "not UTF-8");
    }

    proptest::proptest! {
        #[test]
        fn the_fast_path_agrees_with_the_parser(value in proptest::collection::vec(0u8..0x80, 0..12)) {
            let mut quoted = vec![b'"'];
            quoted.extend(&value);
            quoted.push(b'"');
            let parsed = serde_json::from_slice::<&serde_json::value::RawValue>(&quoted).is_ok();
            proptest::prop_assert_eq!(check_value(&quoted).is_ok(), parsed);
        }
    }
}
