//! The deployment policy's decision on a request, taken before anything is fetched, and
//! what it then requires of the image.

use audit::{EventKind, Outcome};
use policy::deploy::{DeployRequest, DeploymentPolicy, Requirements};

use crate::error::{Error, FailureClass};
use crate::fetch::ImageManifest;
use crate::record::Recorder;
use crate::unpack::Limits;

/// The deployment policy a request is checked against.
#[derive(Clone)]
pub struct Deployment {
    pub policy: std::sync::Arc<DeploymentPolicy>,
    /// The attested IPU class, when known.
    pub ipu_class: Option<String>,
}

/// What a request was admitted with: the unpack limits to enforce (the stricter of the
/// service's and the policy's) and the policy's requirements, when a policy decided.
#[derive(Clone, Debug)]
pub struct Admission {
    pub limits: Limits,
    pub requirements: Option<Requirements>,
}

/// Decides the request with the deployment policy (if any).
pub fn admit(
    deployment: Option<&Deployment>,
    service_limits: &Limits,
    image: &str,
    rec: &Recorder,
) -> Result<Admission, Error> {
    let Some(deployment) = deployment else {
        return Ok(Admission {
            limits: service_limits.clone(),
            requirements: None,
        });
    };
    let (tenant, function) = (rec.tenant(), rec.function());
    if tenant.is_empty() || function.is_empty() {
        return Err(Error::invalid(
            "a deployment policy decides for a tenant and a function: both must be given",
        ));
    }
    let request = DeployRequest {
        tenant: tenant.to_string(),
        function: function.to_string(),
        image: image.to_string(),
        ipu_class: deployment.ipu_class.clone(),
    };
    let decision = policy::deploy::evaluate(&deployment.policy, &request);
    let details = [
        ("policy", "deployment".to_string()),
        ("decided_by", decision.decided_by.clone()),
    ];
    let Some(r) = decision.requirements.filter(|_| decision.allowed) else {
        let e = Error::new(FailureClass::RejectedByPolicy, decision.reason);
        return Err(rec.refuse(EventKind::PolicyDecision, e, &details));
    };
    if r.require_hardware_crypto {
        let hw = ocicrypt::hardware_acceleration();
        if !(hw.aes_ni && hw.sha_ni) {
            let e = Error::new(
                FailureClass::RejectedByPolicy,
                format!("the deployment policy requires hardware crypto, and this IPU has {hw}"),
            );
            return Err(rec.refuse(EventKind::PolicyDecision, e, &details));
        }
    }
    rec.record(
        EventKind::PolicyDecision,
        Outcome::Allowed,
        &decision.reason,
        &details,
    )?;
    Ok(Admission {
        limits: tightened(service_limits, &r),
        requirements: Some(r),
    })
}

/// The stricter of the service's limits and the policy's; device nodes as the policy says.
fn tightened(service: &Limits, r: &Requirements) -> Limits {
    let mut limits = service.clone();
    let tighten = |current: &mut u64, policy: Option<u64>| {
        if let Some(p) = policy {
            *current = (*current).min(p);
        }
    };
    tighten(&mut limits.max_unpacked_bytes, r.max_unpacked_bytes);
    tighten(&mut limits.max_file_size, r.max_file_bytes);
    tighten(&mut limits.max_inodes, r.max_inodes);
    limits.allow_device_nodes = r.allow_device_nodes;
    limits
}

/// Layer count, image size and encryption, checked before any layer is fetched.
pub fn check_image(
    r: &Requirements,
    manifest: &ImageManifest,
    rec: &Recorder,
) -> Result<(), Error> {
    let details = [("policy", "deployment".to_string())];
    let fail = |class, message: String| {
        Err(rec.refuse(
            EventKind::PolicyDecision,
            Error::new(class, message),
            &details,
        ))
    };
    if let Some(max) = r.max_layers {
        if manifest.layers.len() as u64 > u64::from(max) {
            return fail(
                FailureClass::TooLarge,
                format!(
                    "the image has {} layers; the deployment policy allows {max}",
                    manifest.layers.len()
                ),
            );
        }
    }
    if let Some(max) = r.max_image_bytes {
        let total: u64 = manifest
            .layers
            .iter()
            .map(|l| l.size)
            .fold(manifest.config.size, u64::saturating_add);
        if total > max {
            return fail(
                FailureClass::TooLarge,
                format!("the image is {total} bytes; the deployment policy allows {max}"),
            );
        }
    }
    if r.require_encryption {
        if let Some((i, l)) = manifest
            .layers
            .iter()
            .enumerate()
            .find(|(_, l)| !ocicrypt::is_encrypted_media_type(&l.media_type))
        {
            return fail(
                FailureClass::RejectedByPolicy,
                format!(
                    "layer {i} ({}) is not encrypted; the deployment policy requires encryption for this function",
                    l.digest
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_only_tightens_limits() {
        let service = Limits {
            max_unpacked_bytes: 100,
            max_file_size: 50,
            max_inodes: 10,
            allow_device_nodes: true,
        };
        let r = Requirements {
            max_unpacked_bytes: Some(1_000),
            max_file_bytes: Some(5),
            max_inodes: None,
            allow_device_nodes: false,
            ..Requirements::default()
        };
        let l = tightened(&service, &r);
        assert_eq!(l.max_unpacked_bytes, 100);
        assert_eq!(l.max_file_size, 5);
        assert_eq!(l.max_inodes, 10);
        assert!(!l.allow_device_nodes);
    }
}
