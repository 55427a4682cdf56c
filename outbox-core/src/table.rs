use crate::error::{Error, Result};
use std::fmt;

/// The longest table name accepted: derived names (`<table>_aggregates`, index names) must stay
/// under PostgreSQL's 63-byte identifier limit.
pub const MAX_TABLE_NAME_LEN: usize = 40;

/// A validated outbox table name: lowercase ASCII letters, digits and `_`, not starting with a
/// digit, at most [`MAX_TABLE_NAME_LEN`] bytes.
///
/// The name is interpolated into SQL (identifiers cannot be bound as parameters), so nothing
/// else is ever accepted; it is also always double-quoted in the statements.
///
/// ```
/// use outbox_core::TableName;
/// assert!(TableName::new("payments_outbox").is_ok());
/// assert!(TableName::new("outbox; DROP TABLE users").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TableName(String);

impl TableName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let reject = |reason| {
            Err(Error::InvalidTableName {
                name: name.clone(),
                reason,
            })
        };
        let Some(first) = name.chars().next() else {
            return reject("it is empty");
        };
        if name.len() > MAX_TABLE_NAME_LEN {
            return reject("it is longer than 40 bytes");
        }
        if !(first.is_ascii_lowercase() || first == '_') {
            return reject("it must start with a lowercase ASCII letter or '_'");
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return reject("only lowercase ASCII letters, digits and '_' are allowed");
        }
        Ok(Self(name))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A derived identifier, `<table>_<suffix>`.
    pub(crate) fn derived(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.0)
    }
}

impl Default for TableName {
    fn default() -> Self {
        Self("outbox".to_owned())
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for ok in ["outbox", "_x", "a1_b2", &"a".repeat(40)] {
            assert_eq!(TableName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "1abc",
            "Outbox",
            "out box",
            "outbox\"",
            "public.outbox",
            "x;drop table y",
            "é",
            &"a".repeat(41),
        ] {
            let err = TableName::new(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidTableName { ref name, .. } if name == bad),
                "{bad:?}: {err}"
            );
        }
    }
}
