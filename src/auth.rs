//! The cluster token: a shared secret that every node of a cluster holds when it runs with
//! one. Nodes prove they hold it without sending it: each side of an RPC connection answers
//! the other's random nonce with an HMAC-SHA256 of the nonce and both identities under the
//! token (see [`crate::rpc`]). The test-only `/internal/fault` endpoint takes it as a header,
//! compared in constant time. The course endpoints, `/metrics` and `/cluster/status` never
//! ask for it.

use std::fmt;
use std::sync::Arc;

use hmac::Mac;
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

    fn mac(&self, role: &str, nonce: &str, speaker: &str, listener: &str) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(self.0.as_bytes()).expect("HMAC takes a key of any length");
        for part in ["ringkv-rpc-v1", role, nonce, speaker, listener] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// Proof that `speaker`, talking to `listener` as `role` ("server" or "client"), holds
    /// this token: the HMAC of the listener's `nonce`, in hex.
    pub fn prove(&self, role: &str, nonce: &str, speaker: &str, listener: &str) -> String {
        let tag = self
            .mac(role, nonce, speaker, listener)
            .finalize()
            .into_bytes();
        tag.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `proof` is [`ClusterToken::prove`] of the same arguments (constant time).
    pub fn verify(
        &self,
        proof: &str,
        role: &str,
        nonce: &str,
        speaker: &str,
        listener: &str,
    ) -> bool {
        let Some(tag) = from_hex(proof) else {
            return false;
        };
        self.mac(role, nonce, speaker, listener)
            .verify_slice(&tag)
            .is_ok()
    }

    /// Whether `offered` (the header's bytes, if any) is this token, in constant time.
    pub fn accepts(&self, offered: Option<&[u8]>) -> bool {
        constant_time_eq(self.0.as_bytes(), offered.unwrap_or_default())
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
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

    #[test]
    fn proofs_bind_the_token_the_nonce_the_role_and_both_identities() {
        let token = ClusterToken::new("s3cret").unwrap();
        let proof = token.prove("server", "00ff", "10.0.0.1:1", "10.0.0.2:1");
        assert!(token.verify(&proof, "server", "00ff", "10.0.0.1:1", "10.0.0.2:1"));
        assert!(!proof.contains("s3cret"));
        assert!(!token.verify(&proof, "client", "00ff", "10.0.0.1:1", "10.0.0.2:1"));
        assert!(!token.verify(&proof, "server", "00fe", "10.0.0.1:1", "10.0.0.2:1"));
        assert!(!token.verify(&proof, "server", "00ff", "10.0.0.3:1", "10.0.0.2:1"));
        assert!(!token.verify(&proof, "server", "00ff", "10.0.0.1:1", "10.0.0.3:1"));
        let other = ClusterToken::new("guess").unwrap();
        assert!(!other.verify(&proof, "server", "00ff", "10.0.0.1:1", "10.0.0.2:1"));
        assert!(!token.verify("zz", "server", "00ff", "10.0.0.1:1", "10.0.0.2:1"));
        assert!(!token.verify("", "server", "00ff", "10.0.0.1:1", "10.0.0.2:1"));
    }
}
