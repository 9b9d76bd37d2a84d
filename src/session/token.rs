//! The session's secret token, wiped from memory when the session closes.

use std::fmt;

use zeroize::Zeroize;

/// A session's secret (an authentication token or key material).
///
/// The bytes are overwritten with zeros (with [`zeroize`], which the compiler
/// may not optimise away) when the token is dropped, which happens when its
/// session closes. `Debug` never shows the bytes.
///
/// # Example
///
/// ```
/// use session_lifecycle::session::SessionToken;
///
/// let token = SessionToken::from(b"secret".to_vec());
/// assert_eq!(token.as_bytes(), b"secret");
/// assert_eq!(token.len(), 6);
/// assert!(!token.is_empty());
/// assert_eq!(format!("{token:?}"), "SessionToken(6 bytes)");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(Box<[u8]>);

impl SessionToken {
    /// Returns the token's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Returns the token's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Returns `true` for an empty token.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SessionToken {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes.into_boxed_slice())
    }
}

impl From<&[u8]> for SessionToken {
    fn from(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }
}

impl Drop for SessionToken {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionToken({} bytes)", self.0.len())
    }
}
