//! Rule owners: a label a client puts on the rules it makes (a container
//! id, a unit name), so that tenants of one daemon each change only their
//! own rules.

use std::fmt;

/// Longest owner label, in bytes.
pub const MAX_OWNER: usize = 64;

/// An owner label: 1 to [`MAX_OWNER`] bytes of `[A-Za-z0-9._:@/-]`.
///
/// The alphabet keeps labels safe to print in a listing, a log line or a
/// state file without quoting, and leaves room for the forms orchestrators
/// use (`podman:3f2a…`, `user@1000.service`, `ns/name`).
///
/// Shared, not copied: a table of thousands of rules holds an owner beside
/// each, and is copied for every transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(std::sync::Arc<str>);

/// Why a label is not an owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    /// No bytes.
    #[error("an owner name cannot be empty")]
    Empty,
    /// Too many bytes.
    #[error("owner name '{0}…' is longer than {MAX_OWNER} bytes")]
    TooLong(String),
    /// A byte outside the alphabet.
    #[error("owner name '{name}' has '{bad}': use letters, digits and . _ : @ / -")]
    BadChar {
        /// The label, for the message (lossy for non-UTF-8).
        name: String,
        /// The first byte that is not allowed.
        bad: char,
    },
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".:_@/-".contains(&b)
}

impl Owner {
    /// Checks `label` and makes it an owner.
    pub fn new(label: &str) -> Result<Owner, OwnerError> {
        Owner::from_bytes(label.as_bytes())
    }

    /// Checks raw bytes (from the wire) and makes them an owner.
    pub fn from_bytes(raw: &[u8]) -> Result<Owner, OwnerError> {
        if raw.is_empty() {
            return Err(OwnerError::Empty);
        }
        if raw.len() > MAX_OWNER {
            let head = String::from_utf8_lossy(raw.get(..16).unwrap_or(raw)).into_owned();
            return Err(OwnerError::TooLong(head));
        }
        if let Some(&bad) = raw.iter().find(|&&b| !allowed(b)) {
            return Err(OwnerError::BadChar {
                name: String::from_utf8_lossy(raw).into_owned(),
                bad: char::from(bad),
            });
        }
        // Every allowed byte is ASCII.
        Ok(Owner(String::from_utf8_lossy(raw).into()))
    }

    /// The least owner in the order of labels: where a range over owners
    /// starts.
    pub(crate) fn min() -> Owner {
        Owner("".into())
    }

    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Owner {
    type Err = OwnerError;
    fn from_str(s: &str) -> Result<Owner, OwnerError> {
        Owner::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_orchestrators_use_are_owners() {
        for ok in [
            "a",
            "podman:3f2a9c",
            "user@1000.service",
            "ns/web-1",
            "A.b_c",
        ] {
            assert_eq!(Owner::new(ok).unwrap().as_str(), ok);
        }
        assert_eq!(Owner::new(&"x".repeat(64)).unwrap().as_str().len(), 64);
    }

    #[test]
    fn bad_labels_are_refused_with_the_reason() {
        assert_eq!(Owner::new(""), Err(OwnerError::Empty));
        assert!(matches!(
            Owner::new(&"x".repeat(65)),
            Err(OwnerError::TooLong(_))
        ));
        let e = Owner::new("a b").unwrap_err();
        assert!(e.to_string().contains("' '"), "{e}");
        assert!(Owner::from_bytes(b"caf\xc3\xa9").is_err());
        assert!(Owner::new("a\nb").is_err());
    }
}
