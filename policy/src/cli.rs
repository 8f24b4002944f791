//! The operations of the `policy` command line: each reads its inputs, decides, prints its
//! report and returns the exit code; `cmdline` only parses arguments and calls them. The
//! reports are rendered by pure functions (`render_*`) so they can be tested.
//!
//! Exit codes: 0 ok / allowed, [`EXIT_DENIED`] (3) rejected or denied (or lint warnings, or a
//! bundle refused, or failing cases); a [`CliError`] is exit code 1.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::deploy::bundle::{self, BundleContent, BundleError};
use crate::deploy::suite::{self, Cases, Change, SuiteError};
use crate::deploy::{self, DeployDecision, DeployRequest, DeploymentPolicy, ParseError};
use crate::grant;
use crate::reference::{ImageReference, ReferenceError};
use crate::sigstore::{KeyFileError, VerificationKey};
use crate::trust::{Evaluation, Precheck};
use crate::{Policy, PolicyError};

/// Rejected, denied, warnings, a refused bundle or failing cases.
pub const EXIT_DENIED: u8 = 3;

/// Why a command could not do its work (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {} (it must not exist): {source}", path.display())]
    CreateNew {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    TrustPolicy(#[from] PolicyError),
    #[error(transparent)]
    Deployment(#[from] ParseError),
    #[error(transparent)]
    Cases(#[from] SuiteError),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// A bundle given as the policy to explain was refused.
    #[error("{}: {source}", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    /// The running bundle given for the anti-rollback check was refused.
    #[error("running bundle {}: {source}", path.display())]
    RunningBundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error(transparent)]
    Signing(BundleError),
    #[error("no randomness")]
    NoRandomness,
    /// A grant could not be issued (invalid fields or an unusable key).
    #[error("cannot issue the grant: {0}")]
    Issue(String),
    #[error("{0}")]
    Usage(String),
    #[error("generated key does not parse")]
    GeneratedKey,
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn exit(ok: bool) -> u8 {
    if ok {
        0
    } else {
        EXIT_DENIED
    }
}

/// The deployment policy in `path` (its path names it in errors).
pub fn load_deployment(path: &Path) -> Result<DeploymentPolicy, CliError> {
    Ok(deploy::parse(&read(path)?, &path.display().to_string())?)
}

/// `policy check`: the scope and requirements of a containers-policy.json for an image.
pub fn check(policy: &Path, image: &str, json: bool) -> Result<u8, CliError> {
    let reference = ImageReference::parse(image)?;
    let policy = Policy::from_file(policy)?;
    let evaluation = policy.requirements_for(&reference);
    println!("{}", render_check(&reference, &evaluation, json));
    Ok(exit(evaluation.precheck() != Precheck::Rejected))
}

/// The report of `policy check` (without the final newline).
pub fn render_check(reference: &ImageReference, evaluation: &Evaluation<'_>, json: bool) -> String {
    let precheck = evaluation.precheck();
    let requirements: Vec<String> = evaluation
        .requirements
        .iter()
        .map(|r| r.to_string())
        .collect();
    if json {
        let out = serde_json::json!({
            "image": reference.to_string(),
            "scope": evaluation.scope,
            "requirements": requirements,
            "decision": precheck,
        });
        return out.to_string();
    }
    let mut lines = vec![
        format!("image:        {reference}"),
        format!("scope:        {}", evaluation.scope),
    ];
    lines.extend(requirements.iter().map(|r| format!("requirement:  {r}")));
    let words = match precheck {
        Precheck::Rejected => "rejected by policy",
        Precheck::AcceptedWithoutSignature => "accepted without signature verification",
        Precheck::SignatureRequired => "accepted only with a valid signature (checked at pull)",
    };
    lines.push(format!("decision:     {words}"));
    lines.join("\n")
}

/// `policy lint`: each warning as `FILE:LINE:COL: ...` (exit 3), or `FILE: ok`.
pub fn lint(path: &Path) -> Result<u8, CliError> {
    let text = read(path)?;
    let origin = path.display().to_string();
    let doc = deploy::parse(&text, &origin)?;
    let warnings = deploy::lint(&doc, &text);
    for w in &warnings {
        println!("{origin}:{w}");
    }
    if warnings.is_empty() {
        println!("{origin}: ok");
    }
    Ok(exit(warnings.is_empty()))
}

/// Where `policy explain` takes its deployment policy from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// A deployment policy file.
    File(PathBuf),
    /// A signed bundle, verified with the keys in these PEM files.
    Bundle { path: PathBuf, keys: Vec<PathBuf> },
}

impl PolicySource {
    /// The deployment policy (a bundle is verified first, with no anti-rollback check).
    pub fn load(&self) -> Result<DeploymentPolicy, CliError> {
        match self {
            PolicySource::File(path) => load_deployment(path),
            PolicySource::Bundle { path, keys } => {
                let bytes = read_bytes(path)?;
                let keys = VerificationKey::from_pem_files(keys)?;
                bundle::verify(&bytes, &keys, None)
                    .map(|b| b.deployment)
                    .map_err(|source| CliError::Bundle {
                        path: path.clone(),
                        source,
                    })
            }
        }
    }
}

/// `policy explain`: the decision on `request` (and on releasing `key_id`, if given) with
/// every rule consulted; exit 3 when denied.
pub fn explain(
    source: &PolicySource,
    request: &DeployRequest,
    key_id: Option<&str>,
    json: bool,
) -> Result<u8, CliError> {
    let doc = source.load()?;
    let decision = match key_id {
        Some(k) => deploy::evaluate_key_release(&doc, request, k),
        None => deploy::evaluate(&doc, request),
    };
    println!("{}", render_explanation(request, key_id, &decision, json));
    Ok(exit(decision.allowed))
}

/// The report of `policy explain` (without the final newline).
pub fn render_explanation(
    request: &DeployRequest,
    key_id: Option<&str>,
    decision: &DeployDecision,
    json: bool,
) -> String {
    if json {
        let out = serde_json::json!({ "request": request, "key_id": key_id, "decision": decision });
        return serde_json::to_string_pretty(&out).expect("serializes");
    }
    let mut lines = vec![
        format!(
            "decision:    {}",
            if decision.allowed {
                "allowed"
            } else {
                "denied"
            }
        ),
        format!("decided by:  {}", decision.decided_by),
        format!("reason:      {}", decision.reason),
    ];
    for c in &decision.consulted {
        lines.push(format!(
            "consulted:   {} ({}): {}",
            c.rule,
            if c.matched { "matched" } else { "skipped" },
            c.note
        ));
    }
    if let Some(r) = &decision.requirements {
        lines.push(format!(
            "requires:    signature={} encryption={} hardware crypto={}",
            r.require_signature, r.require_encryption, r.require_hardware_crypto
        ));
        lines.push(format!(
            "limits:      {}",
            serde_json::to_string(r).expect("serializes")
        ));
    }
    lines.join("\n")
}

fn load_cases(path: &Path) -> Result<Cases, CliError> {
    Ok(suite::parse_cases(
        &read(path)?,
        &path.display().to_string(),
    )?)
}

/// `policy test`: runs the table of cases against the policy; exit 3 if any fails.
pub fn test(policy: &Path, cases: &Path) -> Result<u8, CliError> {
    let doc = load_deployment(policy)?;
    let results = suite::run(&doc, &load_cases(cases)?)?;
    let failed = results.iter().filter(|r| !r.passed).count();
    for r in &results {
        println!(
            "{} {}: {}",
            if r.passed { "PASS" } else { "FAIL" },
            r.label,
            r.detail
        );
    }
    println!("{} cases, {failed} failed", results.len());
    Ok(exit(failed == 0))
}

/// `policy diff`: the requests whose outcome changes from `old` to `new`; exit 3 if any.
pub fn diff(old: &Path, new: &Path, requests: &Path) -> Result<u8, CliError> {
    let (a, b) = (load_deployment(old)?, load_deployment(new)?);
    let requests = load_cases(requests)?;
    let changes = suite::diff(&a, &b, &requests);
    for c in &changes {
        println!("{}", render_change(c));
    }
    println!(
        "{} of {} requests change outcome",
        changes.len(),
        requests.cases.len()
    );
    Ok(exit(changes.is_empty()))
}

/// One changed request of `policy diff` (three lines, without the final newline).
pub fn render_change(c: &Change) -> String {
    let word = |allowed: bool| if allowed { "allow" } else { "deny" };
    format!(
        "{} -> {}: {}\n  old: {} ({})\n  new: {} ({})",
        word(c.old.allowed),
        word(c.new.allowed),
        c.label,
        c.old.decided_by,
        c.old.reason,
        c.new.decided_by,
        c.new.reason
    )
}

/// The kind of key `policy keygen` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyKind {
    Ed25519,
    EcP256,
}

/// `policy keygen`: a signing key for policy bundles or placement grants, `out/priv.pem`
/// (PKCS#8, 0600, must not exist) and `out/pub.pem` (SPKI).
pub fn keygen(out: &Path, kind: KeyKind) -> Result<u8, CliError> {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let (pkcs8, spki) = match kind {
        KeyKind::Ed25519 => {
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| CliError::NoRandomness)?;
            let keypair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| CliError::GeneratedKey)?;
            let spki = bundle::ed25519_spki(keypair.public_key().as_ref());
            (pkcs8, spki)
        }
        KeyKind::EcP256 => {
            let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
            let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
                .map_err(|_| CliError::NoRandomness)?;
            let keypair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
                .map_err(|_| CliError::GeneratedKey)?;
            let spki = crate::dsse::p256_spki(keypair.public_key().as_ref());
            (pkcs8, spki)
        }
    };
    std::fs::create_dir_all(out).map_err(|source| CliError::CreateDir {
        path: out.to_path_buf(),
        source,
    })?;
    let private =
        zeroize::Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref())));
    let path = out.join("priv.pem");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| CliError::CreateNew {
            path: path.clone(),
            source,
        })?;
    f.write_all(private.as_bytes())
        .map_err(|source| CliError::Write { path, source })?;
    let public = out.join("pub.pem");
    std::fs::write(&public, pem::encode(&pem::Pem::new("PUBLIC KEY", spki))).map_err(|source| {
        CliError::Write {
            path: public,
            source,
        }
    })?;
    println!("wrote {0}/priv.pem and {0}/pub.pem", out.display());
    Ok(0)
}

/// The image trust policy a deployment policy names: `image_trust` if given, else the
/// file it names, relative to the deployment policy's directory.
pub fn image_trust_path(
    deployment: &Path,
    doc: &DeploymentPolicy,
    image_trust: Option<&Path>,
) -> PathBuf {
    match image_trust {
        Some(p) => p.to_path_buf(),
        None => deployment
            .parent()
            .unwrap_or(Path::new("."))
            .join(&doc.image_trust_policy),
    }
}

/// `policy sign`: a bundle of the deployment policy and its image trust policy (both
/// checked first) at `version`, signed with the PKCS#8 key in `key`, written to `output`.
pub fn sign(
    deployment: &Path,
    image_trust: Option<&Path>,
    version: u64,
    key: &Path,
    output: &Path,
) -> Result<u8, CliError> {
    let text = read(deployment)?;
    let doc = deploy::parse(&text, &deployment.display().to_string())?;
    let trust_path = image_trust_path(deployment, &doc, image_trust);
    let trust = read(&trust_path)?;
    Policy::parse(trust.as_bytes(), &trust_path.display().to_string(), None)?;
    let private = zeroize::Zeroizing::new(read_bytes(key)?);
    let signed = bundle::sign(
        &BundleContent {
            version,
            deployment: text,
            image_trust: trust,
        },
        &private,
    )
    .map_err(CliError::Signing)?;
    std::fs::write(output, signed).map_err(|source| CliError::Write {
        path: output.to_path_buf(),
        source,
    })?;
    println!("signed version {version} into {}", output.display());
    Ok(0)
}

/// `policy verify`: the bundle against the trusted keys and the running bundle's version;
/// `ok: ...` (exit 0) or `refused: ...` (exit 3).
pub fn verify(path: &Path, keys: &[PathBuf], running: Option<&Path>) -> Result<u8, CliError> {
    let keys = VerificationKey::from_pem_files(keys)?;
    let running = match running {
        Some(r) => Some(
            bundle::verify(&read_bytes(r)?, &keys, None)
                .map_err(|source| CliError::RunningBundle {
                    path: r.to_path_buf(),
                    source,
                })?
                .content,
        ),
        None => None,
    };
    let bytes = read_bytes(path)?;
    let verdict = bundle::verify(&bytes, &keys, running.as_ref().map(|c| (c.version, c)));
    println!("{}", render_verdict(&verdict));
    Ok(exit(verdict.is_ok()))
}

/// The one-line report of `policy verify`.
pub fn render_verdict(verdict: &Result<bundle::VerifiedBundle, BundleError>) -> String {
    match verdict {
        Ok(b) => format!(
            "ok: version {} signed by {}; {} tenants, {} key rules, {} IPU classes",
            b.content.version,
            b.signer,
            b.deployment.tenants.len(),
            b.deployment.keys.len(),
            b.deployment.ipu_classes.len()
        ),
        Err(e) => format!("refused: {e}"),
    }
}

/// What `policy grant issue` signs (the image as one of its three forms).
#[derive(Clone, Debug)]
pub struct IssueRequest {
    pub tenant: String,
    pub function: String,
    pub image: grant::ImageClaim,
    pub ipu: String,
    pub host: String,
    /// Default: now.
    pub not_before: Option<String>,
    pub valid_for: std::time::Duration,
    /// Default: 128 random bits in hex.
    pub serial: Option<String>,
}

/// `policy grant issue`: signs a placement grant with the key in `key`; prints the
/// envelope or writes it to `out`; with `json`, prints a summary object instead.
pub fn grant_issue(
    key: &Path,
    request: IssueRequest,
    out: Option<&Path>,
    json: bool,
) -> Result<u8, CliError> {
    let not_before = match &request.not_before {
        Some(t) => grant::parse_time(t).map_err(CliError::Usage)?,
        None => {
            // Whole seconds, as the grant carries them.
            let now = std::time::SystemTime::now();
            let secs = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| CliError::Usage("the clock is before 1970".into()))?
                .as_secs();
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
        }
    };
    let serial = match request.serial {
        Some(s) => s,
        None => grant::new_serial().map_err(|_| CliError::NoRandomness)?,
    };
    let g = grant::Grant {
        version: grant::VERSION,
        serial,
        tenant: request.tenant,
        function: request.function,
        image: request.image,
        ipu: request.ipu,
        host: request.host,
        not_before,
        not_after: not_before
            .checked_add(request.valid_for)
            .ok_or_else(|| CliError::Usage("--valid-for is far too long".into()))?,
    };
    let private = zeroize::Zeroizing::new(read_bytes(key)?);
    let (envelope, keyid) =
        grant::sign(&g, &private).map_err(|e| CliError::Issue(e.to_string()))?;
    if let Some(path) = out {
        std::fs::write(path, &envelope).map_err(|source| CliError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    }
    if json {
        let mut summary = serde_json::json!({
            "serial": g.serial,
            "not_before": grant::format_time(g.not_before),
            "not_after": grant::format_time(g.not_after),
            "key_id": keyid,
        });
        match out {
            Some(path) => summary["envelope_path"] = path.display().to_string().into(),
            None => {
                summary["envelope"] = serde_json::from_str(&envelope).expect("envelope is JSON")
            }
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("serializes")
        );
    } else if let Some(path) = out {
        println!(
            "issued grant {} (valid {} to {}, key {keyid}) into {}",
            g.serial,
            grant::format_time(g.not_before),
            grant::format_time(g.not_after),
            path.display()
        );
    } else {
        print!("{envelope}");
    }
    Ok(0)
}

/// `policy grant verify`: the grant in `path` against the policy's grant keys and the
/// expectation; `ok: ...` (exit 0) or `refused (CODE): ...` (exit 3).
pub fn grant_verify(
    source: &PolicySource,
    path: &Path,
    ipu: &str,
    host: Option<&str>,
    image: &str,
    at: Option<&str>,
    json: bool,
) -> Result<u8, CliError> {
    let doc = source.load()?;
    let now = match at {
        Some(t) => grant::parse_time(t).map_err(CliError::Usage)?,
        None => std::time::SystemTime::now(),
    };
    let bytes = read_bytes(path)?;
    let verdict = grant::verify(
        &bytes,
        &doc,
        &grant::Expectation {
            ipu,
            host,
            image,
            now,
        },
    );
    println!("{}", render_grant_verdict(&verdict, json));
    Ok(exit(verdict.is_ok()))
}

/// The report of `policy grant verify` (without the final newline).
pub fn render_grant_verdict(
    verdict: &Result<grant::VerifiedGrant, grant::GrantError>,
    json: bool,
) -> String {
    match (verdict, json) {
        (Ok(v), true) => serde_json::to_string_pretty(&serde_json::json!({
            "valid": true,
            "serial": v.serial(),
            "tenant": v.tenant(),
            "function": v.function(),
            "image": v.image(),
            "not_after": grant::format_time(v.not_after()),
            "signer": v.signer_id,
            "signer_keyid": v.signer_keyid,
        }))
        .expect("serializes"),
        (Err(e), true) => serde_json::to_string_pretty(&serde_json::json!({
            "valid": false,
            "reason_code": e.reason_code(),
            "reason": e.to_string(),
        }))
        .expect("serializes"),
        (Ok(v), false) => format!(
            "ok: grant {} for function {:?} of tenant {:?}, {}, signed by {} ({}), valid until {}",
            v.serial(),
            v.function(),
            v.tenant(),
            v.image(),
            v.signer_id,
            v.signer_keyid,
            grant::format_time(v.not_after())
        ),
        (Err(e), false) => format!("refused ({}): {e}", e.reason_code()),
    }
}

/// `policy grant inspect`: the grant's fields and signer key ids, decoded WITHOUT
/// verification (exit 0; exit 3 if it is not even a grant envelope).
pub fn grant_inspect(path: &Path, json: bool) -> Result<u8, CliError> {
    let bytes = read_bytes(path)?;
    let decoded = grant::inspect(&bytes);
    println!("{}", render_inspection(&decoded, json));
    Ok(exit(decoded.is_ok()))
}

/// The report of `policy grant inspect` (without the final newline).
pub fn render_inspection(
    decoded: &Result<grant::Unverified, grant::GrantError>,
    json: bool,
) -> String {
    match (decoded, json) {
        (Err(e), true) => serde_json::to_string_pretty(&serde_json::json!({
            "verified": false,
            "error": e.to_string(),
        }))
        .expect("serializes"),
        (Err(e), false) => format!("UNVERIFIED, not a grant: {e}"),
        (Ok(u), true) => {
            let mut out = serde_json::json!({
                "verified": false,
                "payload_type": grant::PAYLOAD_TYPE,
                "signer_keyids": u.keyids,
            });
            match &u.grant {
                Ok(g) => out["grant"] = serde_json::to_value(g).expect("serializes"),
                Err(e) => out["payload_error"] = e.clone().into(),
            }
            serde_json::to_string_pretty(&out).expect("serializes")
        }
        (Ok(u), false) => {
            let mut lines =
                vec!["UNVERIFIED: decoded without checking signatures or policy".to_string()];
            match &u.grant {
                Ok(g) => {
                    lines.push(format!("serial:      {}", g.serial));
                    lines.push(format!("tenant:      {}", g.tenant));
                    lines.push(format!("function:    {}", g.function));
                    lines.push(format!("image:       {}", g.image));
                    lines.push(format!("ipu:         {}", g.ipu));
                    lines.push(format!("host:        {}", g.host));
                    lines.push(format!("not before:  {}", grant::format_time(g.not_before)));
                    lines.push(format!("not after:   {}", grant::format_time(g.not_after)));
                }
                Err(e) => lines.push(format!("payload:     not a grant: {e}")),
            }
            if u.keyids.is_empty() {
                lines.push("signed by:   nobody (no signatures)".into());
            }
            for k in &u.keyids {
                lines.push(format!("signed by:   {k} (not checked)"));
            }
            lines.join("\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::eval::Consulted;

    fn decision(allowed: bool) -> DeployDecision {
        DeployDecision {
            allowed,
            decided_by: "tenant acme".into(),
            reason: "because".into(),
            consulted: vec![Consulted {
                rule: "tenant acme".into(),
                matched: true,
                note: "n".into(),
            }],
            requirements: None,
        }
    }

    #[test]
    fn explanations_name_the_decision_and_every_rule_consulted() {
        let request = DeployRequest {
            tenant: "acme".into(),
            function: "f".into(),
            image: "docker://r/x:1".into(),
            ipu_class: None,
        };
        assert_eq!(
            render_explanation(&request, None, &decision(false), false),
            "decision:    denied\ndecided by:  tenant acme\nreason:      because\nconsulted:   tenant acme (matched): n"
        );
        let json: serde_json::Value = serde_json::from_str(&render_explanation(
            &request,
            Some("k1"),
            &decision(true),
            true,
        ))
        .unwrap();
        assert_eq!(json["key_id"], "k1");
        assert_eq!(json["decision"]["allowed"], true);
        assert_eq!(json["request"]["tenant"], "acme");
    }

    #[test]
    fn changes_show_both_decisions() {
        let c = Change {
            label: "case 1".into(),
            old: decision(true),
            new: decision(false),
        };
        assert_eq!(
            render_change(&c),
            "allow -> deny: case 1\n  old: tenant acme (because)\n  new: tenant acme (because)"
        );
    }

    #[test]
    fn check_reports_scope_requirements_and_decision() {
        let policy = Policy::parse(
            br#"{"default":[{"type":"reject"}],"transports":{"docker":{"r.io":[{"type":"insecureAcceptAnything"}]}}}"#,
            "p.json",
            None,
        )
        .unwrap();
        let image = ImageReference::parse("docker://r.io/x:1").unwrap();
        let text = render_check(&image, &policy.requirements_for(&image), false);
        assert!(
            text.starts_with(
                "image:        docker://r.io/x:1\nscope:        transports.docker.\"r.io\"\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("decision:     accepted without signature verification"),
            "{text}"
        );
        let other = ImageReference::parse("docker://other.io/x:1").unwrap();
        let json: serde_json::Value = serde_json::from_str(&render_check(
            &other,
            &policy.requirements_for(&other),
            true,
        ))
        .unwrap();
        assert_eq!(json["decision"], "rejected");
    }

    #[test]
    fn the_image_trust_policy_is_found_next_to_the_deployment_policy() {
        let doc = deploy::parse(
            "schema = 1\nimage_trust_policy = \"trust.json\"\n",
            "d.toml",
        )
        .unwrap();
        assert_eq!(
            image_trust_path(Path::new("/etc/p/d.toml"), &doc, None),
            Path::new("/etc/p/trust.json")
        );
        assert_eq!(
            image_trust_path(Path::new("/etc/p/d.toml"), &doc, Some(Path::new("t.json"))),
            Path::new("t.json")
        );
    }

    #[test]
    fn missing_inputs_are_named() {
        let e = lint(Path::new("/nonexistent/d.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read /nonexistent/d.toml: "),
            "{e}"
        );
    }
}
