//! Name patterns with `*` wildcards, for function names and image scopes.
//!
//! Hand-written rather than a glob crate: only `*` is needed (no classes, no escapes), and
//! [`Pattern::covers`] (does one pattern match everything another does) is what lint needs,
//! which glob crates do not offer.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

/// Why a pattern, or an image scope, was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("an empty pattern")]
    Empty,
    #[error("pattern {0:?}: use a single * (it already matches any run of characters)")]
    DoubleStar(String),
    #[error(
        "image scope {0:?} must start with docker://, oci: or dir: (with * wildcards), or be *"
    )]
    NotAnImageScope(String),
}

impl Pattern {
    pub fn new(s: impl Into<String>) -> Result<Self, PatternError> {
        let s = s.into();
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.contains("**") {
            return Err(PatternError::DoubleStar(s));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does `name` match (`*` matches any run of characters, `/` included)?
    pub fn matches(&self, name: &str) -> bool {
        wildcard_match(self.0.as_bytes(), name.as_bytes())
    }

    /// Does every name this pattern's `other` matches also match `self`? (Exact for
    /// literal `other`; for wildcards, `self` must match `other`'s text with each `*` read as
    /// a literal star and `self` must be at least as general.)
    pub fn covers(&self, other: &Pattern) -> bool {
        if self.0 == "*" {
            return true;
        }
        // A star in `other` stands for anything: `self` must accept anything there too.
        // Replacing each star in `other` by a character that cannot appear literally, `self`
        // covers `other` if it matches that string with its own stars absorbing them.
        let probe: String = other.0.replace('*', "\u{0}");
        wildcard_match(self.0.as_bytes(), probe.as_bytes())
            && (self.0.contains('*') || !other.0.contains('*'))
    }

    /// Image scopes are references with wildcards: a transport and something after it.
    pub(crate) fn check_image_scope(&self) -> Result<(), PatternError> {
        let s = &self.0;
        let ok = ["docker://", "oci:", "dir:"]
            .iter()
            .any(|t| s.starts_with(t) && s.len() > t.len());
        if ok || s == "*" {
            Ok(())
        } else {
            Err(PatternError::NotAnImageScope(s.clone()))
        }
    }
}

fn wildcard_match(p: &[u8], s: &[u8]) -> bool {
    // Greedy with backtracking to the last star: linear in practice, no recursion.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] && s[si] != 0 {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Pattern::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn matching() {
        assert!(p("resize-*").matches("resize-jpeg"));
        assert!(p("resize-*").matches("resize-"));
        assert!(!p("resize-*").matches("resiz"));
        assert!(p("*").matches(""));
        assert!(p("a*b*c").matches("aXbYc"));
        assert!(!p("a*b*c").matches("aXbY"));
        assert!(
            p("docker://registry.example/acme/*").matches("docker://registry.example/acme/app:1")
        );
        assert!(
            !p("docker://registry.example/acme/*").matches("docker://registry.example/acmex/app")
        );
    }

    #[test]
    fn coverage() {
        assert!(p("*").covers(&p("resize-*")));
        assert!(p("resize-*").covers(&p("resize-jpeg")));
        assert!(p("resize-*").covers(&p("resize-j*")));
        assert!(!p("resize-jpeg").covers(&p("resize-*")));
        assert!(!p("resize-*").covers(&p("*")));
        assert!(!p("a*").covers(&p("*a")));
        assert!(p("x").covers(&p("x")));
    }

    proptest! {
        /// If `a` covers `b`, every name `b` matches is matched by `a`.
        #[test]
        fn covers_is_sound(
            a in "[ab*]{1,5}", b in "[ab*]{1,5}", name in "[ab]{0,8}"
        ) {
            prop_assume!(!a.contains("**") && !b.contains("**"));
            let (pa, pb) = (p(&a), p(&b));
            if pa.covers(&pb) && pb.matches(&name) {
                prop_assert!(pa.matches(&name), "{a} covers {b} but not {name}");
            }
        }
    }
}
