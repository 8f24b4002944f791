//! RFC 3339 timestamps as the protobuf JSON mapping writes them (`2021-01-12T11:53:27Z`,
//! optional fraction, `Z` or a numeric offset), and a display form for errors.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why an RFC 3339 timestamp was refused.
#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not an RFC 3339 timestamp: {reason}")]
pub struct TimeError {
    pub value: String,
    pub reason: &'static str,
}

fn err(value: &str, reason: &'static str) -> TimeError {
    TimeError {
        value: value.to_string(),
        reason,
    }
}

fn digits(s: &str, value: &str) -> Result<u32, TimeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(value, "expected digits"));
    }
    s.parse().map_err(|_| err(value, "number out of range"))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
pub fn parse_rfc3339(value: &str) -> Result<SystemTime, TimeError> {
    let v = value;
    if v.len() < 20 || !v.is_ascii() {
        return Err(err(value, "too short"));
    }
    let b = v.as_bytes();
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(err(value, "expected YYYY-MM-DDTHH:MM:SS"));
    }
    let year = digits(&v[0..4], value)?;
    let month = digits(&v[5..7], value)?;
    let day = digits(&v[8..10], value)?;
    let hour = digits(&v[11..13], value)?;
    let minute = digits(&v[14..16], value)?;
    let second = digits(&v[17..19], value)?;
    let mut rest = &v[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let end = frac
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| err(value, "missing time zone"))?;
        let f = &frac[..end];
        if f.is_empty() || f.len() > 9 {
            return Err(err(value, "fraction must have 1 to 9 digits"));
        }
        nanos = digits(f, value)? * 10u32.pow(9 - f.len() as u32);
        rest = &frac[end..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            if rest.as_bytes()[3] != b':' {
                return Err(err(value, "bad offset"));
            }
            let h = i64::from(digits(&rest[1..3], value)?);
            let m = i64::from(digits(&rest[4..6], value)?);
            let s = (h * 60 + m) * 60;
            if rest.starts_with('-') {
                -s
            } else {
                s
            }
        }
        _ => return Err(err(value, "missing or bad time zone")),
    };
    let year = u16::try_from(year).map_err(|_| err(value, "year out of range"))?;
    let dt = der::DateTime::new(
        year,
        month as u8,
        day as u8,
        hour as u8,
        minute as u8,
        second as u8,
    )
    .map_err(|_| err(value, "no such date or time"))?;
    let secs = dt.unix_duration().as_secs() as i64 - offset_secs;
    let secs = u64::try_from(secs).map_err(|_| err(value, "before 1970"))?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// A time shown as RFC 3339 UTC (seconds precision) in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rfc3339(pub SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match der::DateTime::from_system_time(self.0) {
            Ok(dt) => write!(f, "{dt}"),
            Err(_) => match self.0.duration_since(UNIX_EPOCH) {
                Ok(d) => write!(f, "@{}", d.as_secs()),
                Err(_) => write!(f, "(before 1970)"),
            },
        }
    }
}

/// Seconds since the Unix epoch as a time (negative values refused by the caller).
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protobuf_timestamps() {
        let t = parse_rfc3339("2023-07-12T15:56:36Z").unwrap();
        assert_eq!(t, from_unix(1689177396));
        let t = parse_rfc3339("2022-12-31T23:59:59.999Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1672531199, 999_000_000)
        );
        assert_eq!(
            parse_rfc3339("2023-07-12T17:56:36+02:00").unwrap(),
            from_unix(1689177396)
        );
        assert_eq!(
            Rfc3339(from_unix(1689177396)).to_string(),
            "2023-07-12T15:56:36Z"
        );
        for bad in [
            "2023-07-12",
            "2023-07-12T15:56:36",
            "2023-13-12T15:56:36Z",
            "x023-07-12T15:56:36Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
