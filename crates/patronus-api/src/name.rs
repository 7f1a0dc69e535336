use std::fmt;
use std::str::FromStr;

/// The name of a link, SLA class or policy: 1 to 63 characters of ASCII letters, digits, `-`,
/// `_` and `.`, starting with a letter or digit. Names appear in URLs, metric labels and log
/// lines, so they are kept to characters that need no escaping anywhere.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name must not be empty")]
    Empty,
    #[error("a name is at most 63 characters, this one has {0}")]
    TooLong(usize),
    #[error("a name must start with a letter or digit")]
    BadStart,
    #[error("a name may contain only letters, digits, '-', '_' and '.', found {0:?}")]
    BadChar(char),
}

impl Name {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        let first = s.chars().next().ok_or(NameError::Empty)?;
        if s.len() > 63 {
            return Err(NameError::TooLong(s.len()));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_usual_identifiers_and_reject_the_rest() {
        for ok in ["realtime", "mpls-1", "inet_2", "a", "v1.2"] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert_eq!(Name::new("-x"), Err(NameError::BadStart));
        assert_eq!(Name::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(Name::new("x".repeat(64)), Err(NameError::TooLong(64)));
    }
}
