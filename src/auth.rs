//! The cluster token: a shared secret that every node-to-node (`/internal/`) request must
//! carry when the cluster runs with one, compared in constant time. The course endpoints,
//! `/metrics` and `/cluster/status` never ask for it.

use std::fmt;
use std::sync::Arc;

use warp::http::HeaderValue;

/// The request header that carries the token.
pub const TOKEN_HEADER: &str = "x-ringkv-token";

/// Why a token was refused at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the cluster token is empty")]
    Empty,
    #[error("the cluster token must be printable ASCII without spaces")]
    NotPrintable,
}

/// A cluster token; its `Debug` form never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(Arc<str>);

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

impl ClusterToken {
    /// Accepts a non-empty token of visible ASCII characters (it travels in a header).
    pub fn new(text: &str) -> Result<ClusterToken, TokenError> {
        if text.is_empty() {
            return Err(TokenError::Empty);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable);
        }
        Ok(ClusterToken(Arc::from(text)))
    }

    /// The token as a header value, marked sensitive so HTTP stacks never log it.
    pub fn header_value(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&self.0).unwrap_or(HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }

    /// The token itself, for sending it.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `offered` (the header's bytes, if any) is this token, in constant time.
    pub fn accepts(&self, offered: Option<&[u8]>) -> bool {
        constant_time_eq(self.0.as_bytes(), offered.unwrap_or_default())
    }
}

/// Compares two byte strings in time that depends only on their lengths, never on where
/// they first differ. The expected token's length is not secret enough to hide.
pub fn constant_time_eq(expected: &[u8], offered: &[u8]) -> bool {
    let mut difference = (expected.len() ^ offered.len()) as u64;
    for (i, &byte) in expected.iter().enumerate() {
        let other = offered.get(i).copied().unwrap_or(!byte);
        difference |= u64::from(byte ^ other);
    }
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert_eq!(ClusterToken::new(""), Err(TokenError::Empty));
        assert_eq!(ClusterToken::new("a b"), Err(TokenError::NotPrintable));
        let token = ClusterToken::new("s3cret").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(token.accepts(Some(b"s3cret")));
        assert!(!token.accepts(Some(b"s3cre")));
        assert!(!token.accepts(None));
        assert!(token.header_value().is_sensitive());
    }
}
