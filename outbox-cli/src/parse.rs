//! Values on the command line: ages, times, ids, aggregates; URLs shown without passwords.

use crate::Failure;
use chrono::{DateTime, Utc};
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// An age: a number and a unit, `s`, `m`, `h`, `d` or `w` (`90s`, `15m`, `7d`); `0` alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "0" {
            return Ok(Self(Duration::ZERO));
        }
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit: write 30s, 15m, 12h, 7d or 2w"))?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not an age such as 30s, 15m, 12h, 7d or 2w"))?;
        let seconds = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 604_800,
            _ => {
                return Err(format!(
                    "unknown unit {unit:?} in {text:?}: use s, m, h, d or w"
                ))
            }
        };
        // A century at most: databases refuse times before year 1.
        n.checked_mul(seconds)
            .filter(|s| *s <= 100 * 365 * 86_400)
            .map(|s| Self(Duration::from_secs(s)))
            .ok_or_else(|| format!("{text:?} is too long (at most a century)"))
    }
}

/// An RFC 3339 time, or an age meaning that long ago.
pub(crate) fn time(text: &str) -> Result<DateTime<Utc>, Failure> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let Span(ago) = text.parse().map_err(|_| {
        Failure::usage(format!(
            "{text:?} is neither an RFC 3339 time (2026-11-27T10:00:00Z) nor an age (2h)"
        ))
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| Failure::usage(format!("{text:?} is too long ago")))
}

pub(crate) fn uuid(text: &str) -> Result<Uuid, Failure> {
    Uuid::parse_str(text.trim())
        .map_err(|e| Failure::usage(format!("{text:?} is not an event id (a UUID): {e}")))
}

/// `TYPE:ID`, split at the first colon (aggregate ids may hold colons, types do not).
pub(crate) fn aggregate(text: &str) -> Result<(String, String), Failure> {
    match text.split_once(':') {
        Some((ty, id)) if !ty.is_empty() && !id.is_empty() => Ok((ty.into(), id.into())),
        _ => Err(Failure::usage(format!(
            "{text:?} is not an aggregate: write TYPE:ID, as in account:42"
        ))),
    }
}

/// The URL with its password replaced by `***`, fit for messages and logs: the user
/// information's password (up to the last `@`, whatever characters it holds) and the values of
/// password parameters in the query. Text that is not a `scheme://` URL is not shown at all,
/// except a `sqlite:` path (SQLite has no password).
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            "(a database URL that is not shown: it is not of the form scheme://…)".to_owned()
        };
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let rest = match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}:***{}", &rest[..colon], &rest[at..]),
            None => rest.to_owned(),
        },
        None => rest.to_owned(),
    };
    let Some(query_start) = rest.find('?') else {
        return format!("{head}{rest}");
    };
    let (path, query) = rest.split_at(query_start + 1);
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if key.to_ascii_lowercase().contains("pass") || key.eq_ignore_ascii_case("pwd") =>
            {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{head}{path}{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!("90s".parse::<Span>().unwrap().0, Duration::from_secs(90));
        assert_eq!(
            "7d".parse::<Span>().unwrap().0,
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!("0".parse::<Span>().unwrap().0, Duration::ZERO);
        for bad in ["", "7", "d", "7x", "-1h", "99999999999999999999w", "1.5h"] {
            assert!(bad.parse::<Span>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn times_and_ids() {
        assert_eq!(
            time("2026-11-27T10:00:00Z").unwrap().to_rfc3339(),
            "2026-11-27T10:00:00+00:00"
        );
        assert!(time("2h").unwrap() < Utc::now());
        assert_eq!(time("yesterday").unwrap_err().code, 2);
        assert_eq!(uuid("nope").unwrap_err().code, 2);
        assert_eq!(
            aggregate("account:eu:42").unwrap(),
            ("account".into(), "eu:42".into())
        );
        assert!(aggregate("account").is_err() && aggregate(":1").is_err());
    }

    #[test]
    fn passwords_never_shown() {
        assert_eq!(
            redact("postgres://app:s3cr@t@db:5432/app?sslmode=require"),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
        assert_eq!(redact("postgres://app@db/app"), "postgres://app@db/app");
        assert_eq!(redact("sqlite:outbox.db"), "sqlite:outbox.db");
        // Found by review: a password in the query, an unencoded '/' in the password, a
        // libpq keyword string.
        assert_eq!(
            redact("postgres://db/app?user=app&password=Sekr3t&sslmode=require"),
            "postgres://db/app?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            redact("postgres://app:ab/cd@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert!(!redact("host=x password=Sekr3t").contains("Sekr3t"));
        assert!(!redact("postgres://db/app?sslpassword=Sekr3t").contains("Sekr3t"));
    }
}
