//! The pure decision function over (policy, request). It reports every rule it consulted, the
//! one that decided, and the reason in words, so `policy explain` and the audit log can show
//! why; and the merged requirements the caller must enforce.

use serde::Serialize;

use super::{DeploymentPolicy, FunctionRule, Settings, Size, Tenant, Ttl};

/// Who wants to run what, where.
#[derive(Clone, Debug, Serialize)]
pub struct DeployRequest {
    pub tenant: String,
    pub function: String,
    /// The image reference as the caller names it (`docker://...`, `oci:...`).
    pub image: String,
    /// The attested IPU class, when known.
    pub ipu_class: Option<String>,
}

/// What the caller must enforce when the request is allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Requirements {
    pub require_signature: bool,
    pub require_encryption: bool,
    pub require_hardware_crypto: bool,
    pub max_image_bytes: Option<u64>,
    pub max_layers: Option<u32>,
    pub max_unpacked_bytes: Option<u64>,
    pub max_inodes: Option<u64>,
    pub max_file_bytes: Option<u64>,
    pub allow_device_nodes: bool,
    pub clone_size: Option<u64>,
    pub clone_ttl_secs: Option<u64>,
}

/// One rule looked at, and what it said.
#[derive(Clone, Debug, Serialize)]
pub struct Consulted {
    pub rule: String,
    pub matched: bool,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeployDecision {
    pub allowed: bool,
    /// The rule that decided (`default deny` when none did).
    pub decided_by: String,
    pub reason: String,
    pub consulted: Vec<Consulted>,
    /// Set when allowed.
    pub requirements: Option<Requirements>,
}

fn deny(decided_by: String, reason: String, consulted: Vec<Consulted>) -> DeployDecision {
    DeployDecision {
        allowed: false,
        decided_by,
        reason,
        consulted,
        requirements: None,
    }
}

fn function_rule_name(t: &Tenant, i: usize, f: &FunctionRule) -> String {
    format!(
        "tenant {:?} function rule #{} {:?}",
        t.name.get_ref(),
        i + 1,
        f.name.get_ref().as_str()
    )
}

/// Most specific setting wins: function over tenant over defaults.
fn merge(levels: &[&Settings]) -> Requirements {
    fn pick<T: Copy>(levels: &[&Settings], f: impl Fn(&Settings) -> Option<T>) -> Option<T> {
        levels.iter().rev().find_map(|s| f(s))
    }
    let size = |v: Option<Size>| v.map(|s| s.0);
    Requirements {
        // Secure by default: signatures and hardware crypto are required unless relaxed.
        require_signature: pick(levels, |s| s.require_signature).unwrap_or(true),
        require_encryption: pick(levels, |s| s.require_encryption).unwrap_or(false),
        require_hardware_crypto: pick(levels, |s| s.require_hardware_crypto).unwrap_or(true),
        max_image_bytes: size(pick(levels, |s| s.limits.max_image_bytes)),
        max_layers: pick(levels, |s| s.limits.max_layers),
        max_unpacked_bytes: size(pick(levels, |s| s.limits.max_unpacked_bytes)),
        max_inodes: pick(levels, |s| s.limits.max_inodes),
        max_file_bytes: size(pick(levels, |s| s.limits.max_file_bytes)),
        allow_device_nodes: pick(levels, |s| s.limits.allow_device_nodes).unwrap_or(false),
        clone_size: size(pick(levels, |s| s.clone.size)),
        clone_ttl_secs: pick(levels, |s| s.clone.ttl).map(|Ttl(d)| d.as_secs()),
    }
}

/// May `req.function` of `req.tenant` run `req.image` (on `req.ipu_class`)?
pub fn evaluate(policy: &DeploymentPolicy, req: &DeployRequest) -> DeployDecision {
    let mut consulted = Vec::new();
    let Some(tenant) = policy
        .tenants
        .iter()
        .find(|t| t.name.get_ref() == &req.tenant)
    else {
        return deny(
            "default deny".into(),
            format!("tenant {:?} is not in the deployment policy", req.tenant),
            consulted,
        );
    };
    for (i, rule) in tenant.functions.iter().enumerate() {
        let name = function_rule_name(tenant, i, rule);
        if !rule.name.get_ref().matches(&req.function) {
            consulted.push(Consulted {
                rule: name,
                matched: false,
                note: format!("function {:?} does not match", req.function),
            });
            continue;
        }
        // The first rule whose name matches decides.
        let image_ok = rule.images.iter().find(|p| p.get_ref().matches(&req.image));
        let Some(scope) = image_ok else {
            consulted.push(Consulted {
                rule: name.clone(),
                matched: true,
                note: "no image scope of this rule matches the image".into(),
            });
            let scopes: Vec<&str> = rule.images.iter().map(|p| p.get_ref().as_str()).collect();
            return deny(
                name,
                format!(
                    "image {:?} is not in the scopes allowed for this function ({})",
                    req.image,
                    scopes.join(", ")
                ),
                consulted,
            );
        };
        if !rule.ipu_classes.is_empty() {
            let class_ok = req
                .ipu_class
                .as_ref()
                .is_some_and(|c| rule.ipu_classes.iter().any(|r| r.get_ref() == c));
            if !class_ok {
                consulted.push(Consulted {
                    rule: name.clone(),
                    matched: true,
                    note: "the IPU class is not one this rule allows".into(),
                });
                let classes: Vec<&str> = rule
                    .ipu_classes
                    .iter()
                    .map(|c| c.get_ref().as_str())
                    .collect();
                return deny(
                    name,
                    format!(
                        "IPU class {} is not allowed for this function (allowed: {})",
                        req.ipu_class
                            .as_deref()
                            .map_or("(none attested)".to_string(), |c| format!("{c:?}")),
                        classes.join(", ")
                    ),
                    consulted,
                );
            }
        }
        consulted.push(Consulted {
            rule: name.clone(),
            matched: true,
            note: format!("image matches scope {:?}", scope.get_ref().as_str()),
        });
        let requirements = merge(&[&policy.defaults, &tenant.settings, &rule.settings]);
        return DeployDecision {
            allowed: true,
            decided_by: name,
            reason: format!(
                "function {:?} of tenant {:?} may run images in {:?}",
                req.function,
                req.tenant,
                scope.get_ref().as_str()
            ),
            consulted,
            requirements: Some(requirements),
        };
    }
    deny(
        "default deny".into(),
        format!(
            "no function rule of tenant {:?} matches function {:?}",
            req.tenant, req.function
        ),
        consulted,
    )
}

/// May key `key_id` be released for this request? The deployment itself must be allowed,
/// and a key rule must list the key for the image, the tenant and the IPU class.
pub fn evaluate_key_release(
    policy: &DeploymentPolicy,
    req: &DeployRequest,
    key_id: &str,
) -> DeployDecision {
    let mut d = evaluate(policy, req);
    if !d.allowed {
        return d;
    }
    let rule_name = format!("key rule {key_id:?}");
    let Some(rule) = policy.keys.iter().find(|k| k.id.get_ref() == key_id) else {
        return deny(
            "default deny".into(),
            format!("key {key_id:?} is not in the deployment policy"),
            d.consulted,
        );
    };
    let checks = [
        (
            rule.images.iter().any(|p| p.get_ref().matches(&req.image)),
            format!("the image {:?} is not in the key's image scopes", req.image),
        ),
        (
            rule.tenants.iter().any(|t| t.get_ref() == &req.tenant),
            format!("tenant {:?} may not use this key", req.tenant),
        ),
        (
            req.ipu_class
                .as_ref()
                .is_some_and(|c| rule.ipu_classes.iter().any(|r| r.get_ref() == c)),
            format!(
                "IPU class {} may not receive this key",
                req.ipu_class.as_deref().unwrap_or("(none attested)")
            ),
        ),
    ];
    for (ok, why) in checks {
        if !ok {
            d.consulted.push(Consulted {
                rule: rule_name.clone(),
                matched: true,
                note: why.clone(),
            });
            return deny(rule_name, why, d.consulted);
        }
    }
    d.consulted.push(Consulted {
        rule: rule_name.clone(),
        matched: true,
        note: "image, tenant and IPU class allowed".into(),
    });
    d.decided_by = rule_name;
    d.reason = format!(
        "key {key_id:?} may be released for {:?} to tenant {:?} on IPU class {:?}",
        req.image,
        req.tenant,
        req.ipu_class.as_deref().unwrap_or_default()
    );
    d
}
