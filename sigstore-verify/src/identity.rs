//! Matching a Fulcio certificate's identity (SAN and OIDC issuer) against what a policy
//! expects. Regular expressions must match the whole value (they are anchored), unlike
//! cosign's `--certificate-identity-regexp`, so that `https://github.com/org/` cannot be
//! satisfied by `https://github.com/org/../evil`-style prefixes or suffixes.

use regex::Regex;

use crate::certificate::CertificateIdentity;

/// How a value must match.
#[derive(Clone, Debug)]
pub enum Matcher {
    Exact(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

#[derive(Debug, thiserror::Error)]
#[error("invalid regular expression {pattern:?}: {source}")]
pub struct PatternError {
    pub pattern: String,
    #[source]
    pub source: regex::Error,
}

impl Matcher {
    pub fn exact(s: impl Into<String>) -> Self {
        Matcher::Exact(s.into())
    }

    /// A regular expression that must match the whole value.
    pub fn regex(pattern: &str) -> Result<Self, PatternError> {
        Regex::new(&format!("^(?:{pattern})$"))
            .map(Matcher::Regex)
            .map_err(|source| PatternError {
                pattern: pattern.to_string(),
                source,
            })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => s == value,
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Matcher::Exact(s) => write!(f, "{s:?}"),
            Matcher::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

/// The identity a keyless signature must come from.
#[derive(Clone, Debug)]
pub struct ExpectedIdentity {
    /// Matched against the certificate's SAN (email, URI, or Fulcio otherName).
    pub san: Matcher,
    /// Matched against the OIDC issuer extension.
    pub issuer: Matcher,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate identity {found:?} does not match {expected}")]
    San {
        expected: String,
        found: Vec<String>,
    },
    #[error("certificate has no OIDC issuer extension")]
    NoIssuer,
    #[error("certificate OIDC issuer {found:?} does not match {expected}")]
    Issuer { expected: String, found: String },
}

impl ExpectedIdentity {
    pub fn check(&self, id: &CertificateIdentity) -> Result<(), IdentityError> {
        if !id.sans.iter().any(|s| self.san.matches(s.as_str())) {
            return Err(IdentityError::San {
                expected: self.san.to_string(),
                found: id.sans.iter().map(|s| s.as_str().to_string()).collect(),
            });
        }
        let issuer = id.issuer.as_deref().ok_or(IdentityError::NoIssuer)?;
        if !self.issuer.matches(issuer) {
            return Err(IdentityError::Issuer {
                expected: self.issuer.to_string(),
                found: issuer.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certificate::San;

    fn id(san: San, issuer: &str) -> CertificateIdentity {
        CertificateIdentity {
            sans: vec![san],
            issuer: Some(issuer.into()),
            ..Default::default()
        }
    }

    #[test]
    fn exact_and_anchored_regex() {
        let wf = "https://github.com/org/repo/.github/workflows/rel.yml@refs/heads/main";
        let iss = "https://token.actions.githubusercontent.com";
        let c = id(San::Uri(wf.into()), iss);
        let exp = ExpectedIdentity {
            san: Matcher::exact(wf),
            issuer: Matcher::exact(iss),
        };
        assert!(exp.check(&c).is_ok());
        let exp = ExpectedIdentity {
            san: Matcher::regex(r"https://github\.com/org/.*").unwrap(),
            issuer: Matcher::exact(iss),
        };
        assert!(exp.check(&c).is_ok());
        // Anchored: a pattern matching only a part is not enough.
        let exp = ExpectedIdentity {
            san: Matcher::regex(r"github\.com/org").unwrap(),
            issuer: Matcher::exact(iss),
        };
        assert!(matches!(exp.check(&c), Err(IdentityError::San { .. })));
        let exp = ExpectedIdentity {
            san: Matcher::exact(wf),
            issuer: Matcher::exact("https://accounts.google.com"),
        };
        assert!(matches!(exp.check(&c), Err(IdentityError::Issuer { .. })));
        let e = id(
            San::Email("a@example.com".into()),
            "https://accounts.google.com",
        );
        let exp = ExpectedIdentity {
            san: Matcher::exact("a@example.com"),
            issuer: Matcher::regex(r"https://accounts\.google\.com").unwrap(),
        };
        assert!(exp.check(&e).is_ok());
        let none = CertificateIdentity {
            sans: vec![San::Email("a@example.com".into())],
            ..Default::default()
        };
        assert_eq!(exp.check(&none), Err(IdentityError::NoIssuer));
    }
}
