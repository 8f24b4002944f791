//! Decision tables: `policy test` runs expected decisions as a test suite (as conftest does
//! for OPA), and `policy diff` shows which sample requests change outcome between two
//! versions of a policy.
//!
//! ```toml
//! [[case]]
//! name = "HD resize runs on gen2 IPUs"
//! tenant = "acme"
//! function = "resize-hd"
//! image = "docker://registry.example/acme/resize-hd:1.0"
//! ipu_class = "dpu-gen2"          # optional
//! key_id = "acme-layers-2026"     # optional: decide the key release too
//! expect = "allow"                # or "deny"
//! decided_by = "rule #1"          # optional: a substring of the deciding rule
//! ```

use serde::Deserialize;

use super::{evaluate, evaluate_key_release, DeployDecision, DeployRequest, DeploymentPolicy};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    #[serde(default)]
    pub name: Option<String>,
    pub tenant: String,
    pub function: String,
    pub image: String,
    #[serde(default)]
    pub ipu_class: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    /// Required by `policy test`; ignored by `policy diff`.
    #[serde(default)]
    pub expect: Option<Expect>,
    #[serde(default)]
    pub decided_by: Option<String>,
}

impl Case {
    fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!(
                "{}/{} {}{}",
                self.tenant,
                self.function,
                self.image,
                self.key_id
                    .as_deref()
                    .map(|k| format!(" key {k}"))
                    .unwrap_or_default()
            )
        })
    }

    pub fn decide(&self, policy: &DeploymentPolicy) -> DeployDecision {
        let req = DeployRequest {
            tenant: self.tenant.clone(),
            function: self.function.clone(),
            image: self.image.clone(),
            ipu_class: self.ipu_class.clone(),
        };
        match &self.key_id {
            Some(k) => evaluate_key_release(policy, &req, k),
            None => evaluate(policy, &req),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cases {
    #[serde(rename = "case")]
    pub cases: Vec<Case>,
}

/// Why a table of cases could not be read or run.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("case {0:?} has no expect = \"allow\" or \"deny\"")]
    NoExpectation(String),
}

pub fn parse_cases(text: &str, origin: &str) -> Result<Cases, SuiteError> {
    toml::from_str(text).map_err(|source| SuiteError::Parse {
        origin: origin.to_string(),
        source,
    })
}

/// One case's result.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub label: String,
    pub passed: bool,
    pub detail: String,
}

/// Runs every case; a case without `expect` is an error.
pub fn run(policy: &DeploymentPolicy, cases: &Cases) -> Result<Vec<Outcome>, SuiteError> {
    cases
        .cases
        .iter()
        .map(|c| {
            let expect = c
                .expect
                .ok_or_else(|| SuiteError::NoExpectation(c.label()))?;
            let d = c.decide(policy);
            let got = if d.allowed {
                Expect::Allow
            } else {
                Expect::Deny
            };
            let by_ok = c
                .decided_by
                .as_ref()
                .is_none_or(|want| d.decided_by.contains(want.as_str()));
            let passed = got == expect && by_ok;
            let detail = format!(
                "{} by {}: {}",
                if d.allowed { "allowed" } else { "denied" },
                d.decided_by,
                d.reason
            );
            Ok(Outcome {
                label: c.label(),
                passed,
                detail,
            })
        })
        .collect()
}

/// A request whose outcome differs between two policies.
#[derive(Clone, Debug)]
pub struct Change {
    pub label: String,
    pub old: DeployDecision,
    pub new: DeployDecision,
}

pub fn diff(old: &DeploymentPolicy, new: &DeploymentPolicy, requests: &Cases) -> Vec<Change> {
    requests
        .cases
        .iter()
        .filter_map(|c| {
            let (a, b) = (c.decide(old), c.decide(new));
            (a.allowed != b.allowed).then(|| Change {
                label: c.label(),
                old: a,
                new: b,
            })
        })
        .collect()
}
