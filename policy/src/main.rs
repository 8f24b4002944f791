//! `policy`: image trust and deployment policy tools.
//!
//! Exit codes: 0 ok / allowed, 3 rejected or denied (or lint warnings, or a bundle refused),
//! 1 operational error (unreadable or invalid input), 2 usage error.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use policy::deploy::bundle::{self, BundleContent};
use policy::deploy::{self, DeployRequest};
use policy::reference::ImageReference;
use policy::sigstore::VerificationKey;
use policy::trust::Precheck;
use policy::Policy;

const EXIT_DENIED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "policy",
    version,
    about = "Image trust and deployment policy tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Which scope and requirements of a containers-policy.json apply to an image.
    Check {
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// docker://HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or dir:PATH
        #[arg(value_name = "IMAGE-REF")]
        image: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a deployment policy: errors (exit 1) and unreachable rules (exit 3), each with
    /// file:line:column.
    Lint {
        #[arg(value_name = "FILE")]
        deployment: PathBuf,
    },
    /// Why a request is allowed or denied: every rule consulted and the one that decided.
    Explain {
        /// A deployment policy file or a signed bundle (`--bundle`).
        #[arg(long, value_name = "FILE", required_unless_present = "bundle")]
        policy: Option<PathBuf>,
        #[arg(long, value_name = "FILE", requires = "key", conflicts_with = "policy")]
        bundle: Option<PathBuf>,
        /// Trusted bundle signing key (SPKI PEM), with `--bundle`.
        #[arg(long, value_name = "FILE")]
        key: Vec<PathBuf>,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        function: String,
        #[arg(long, value_name = "IMAGE-REF")]
        image: String,
        #[arg(long)]
        ipu_class: Option<String>,
        /// Also decide whether this layer key may be released.
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run a table of expected decisions as a test suite (exit 3 if any case fails).
    Test {
        /// The deployment policy under test.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// TOML with [[case]] tables (tenant, function, image, ipu_class, key_id, expect,
        /// decided_by).
        #[arg(value_name = "CASES")]
        cases: PathBuf,
    },
    /// Which sample requests change outcome from OLD to NEW (exit 3 if any do).
    Diff {
        #[arg(value_name = "OLD")]
        old: PathBuf,
        #[arg(value_name = "NEW")]
        new: PathBuf,
        /// TOML with [[case]] tables (expect is ignored).
        #[arg(long, value_name = "FILE")]
        requests: PathBuf,
    },
    /// Make a signing key for policy bundles: DIR/priv.pem (PKCS#8, 0600), DIR/pub.pem.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a bundle of a deployment policy and the image trust policy it names.
    Sign {
        #[arg(long, value_name = "FILE")]
        deployment: PathBuf,
        /// The containers-policy.json (default: the file the deployment policy names, next
        /// to it).
        #[arg(long, value_name = "FILE")]
        image_trust: Option<PathBuf>,
        /// Must be higher than the version running anywhere (anti-rollback).
        #[arg(long)]
        version: u64,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Verify a bundle: trusted signer, documents valid, not older than the running version.
    Verify {
        #[arg(value_name = "BUNDLE")]
        bundle: PathBuf,
        /// Trusted signing key (SPKI PEM, repeatable).
        #[arg(long, value_name = "FILE", required = true)]
        key: Vec<PathBuf>,
        /// The running bundle, for the anti-rollback check.
        #[arg(long, value_name = "BUNDLE")]
        running: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("policy: {message}");
            ExitCode::from(1)
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn trusted_keys(paths: &[PathBuf]) -> Result<Vec<VerificationKey>, String> {
    let mut keys = Vec::new();
    for p in paths {
        keys.extend(
            VerificationKey::from_pem(read(p)?.as_bytes())
                .map_err(|e| format!("key {}: {e}", p.display()))?,
        );
    }
    Ok(keys)
}

fn run(command: Command) -> Result<u8, String> {
    match command {
        Command::Check {
            policy,
            image,
            json,
        } => check(&policy, &image, json),
        Command::Lint { deployment } => {
            let text = read(&deployment)?;
            let origin = deployment.display().to_string();
            let doc = deploy::parse(&text, &origin).map_err(|e| e.to_string())?;
            let warnings = deploy::lint(&doc, &text);
            for w in &warnings {
                println!("{origin}:{w}");
            }
            if warnings.is_empty() {
                println!("{origin}: ok");
                Ok(0)
            } else {
                Ok(EXIT_DENIED)
            }
        }
        Command::Explain {
            policy,
            bundle,
            key,
            tenant,
            function,
            image,
            ipu_class,
            key_id,
            json,
        } => {
            let doc = match (policy, bundle) {
                (Some(p), _) => deploy::parse(&read(&p)?, &p.display().to_string())
                    .map_err(|e| e.to_string())?,
                (None, Some(b)) => {
                    let bytes = std::fs::read(&b)
                        .map_err(|e| format!("cannot read {}: {e}", b.display()))?;
                    bundle::verify(&bytes, &trusted_keys(&key)?, None)
                        .map_err(|e| format!("{}: {e}", b.display()))?
                        .deployment
                }
                (None, None) => unreachable!("clap requires one"),
            };
            let request = DeployRequest {
                tenant,
                function,
                image,
                ipu_class,
            };
            let decision = match &key_id {
                Some(k) => deploy::evaluate_key_release(&doc, &request, k),
                None => deploy::evaluate(&doc, &request),
            };
            if json {
                let out = serde_json::json!({ "request": request, "key_id": key_id, "decision": decision });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).expect("serializes")
                );
            } else {
                println!(
                    "decision:    {}",
                    if decision.allowed {
                        "allowed"
                    } else {
                        "denied"
                    }
                );
                println!("decided by:  {}", decision.decided_by);
                println!("reason:      {}", decision.reason);
                for c in &decision.consulted {
                    println!(
                        "consulted:   {} ({}): {}",
                        c.rule,
                        if c.matched { "matched" } else { "skipped" },
                        c.note
                    );
                }
                if let Some(r) = &decision.requirements {
                    println!(
                        "requires:    signature={} encryption={} hardware crypto={}",
                        r.require_signature, r.require_encryption, r.require_hardware_crypto
                    );
                    println!(
                        "limits:      {}",
                        serde_json::to_string(r).expect("serializes")
                    );
                }
            }
            Ok(if decision.allowed { 0 } else { EXIT_DENIED })
        }
        Command::Test { policy, cases } => {
            let doc = load_deployment(&policy)?;
            let suite = deploy::suite::parse_cases(&read(&cases)?, &cases.display().to_string())?;
            let results = deploy::suite::run(&doc, &suite)?;
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
            Ok(if failed == 0 { 0 } else { EXIT_DENIED })
        }
        Command::Diff { old, new, requests } => {
            let (a, b) = (load_deployment(&old)?, load_deployment(&new)?);
            let suite =
                deploy::suite::parse_cases(&read(&requests)?, &requests.display().to_string())?;
            let changes = deploy::suite::diff(&a, &b, &suite);
            for c in &changes {
                let word = |allowed: bool| if allowed { "allow" } else { "deny" };
                println!(
                    "{} -> {}: {}\n  old: {} ({})\n  new: {} ({})",
                    word(c.old.allowed),
                    word(c.new.allowed),
                    c.label,
                    c.old.decided_by,
                    c.old.reason,
                    c.new.decided_by,
                    c.new.reason
                );
            }
            println!(
                "{} of {} requests change outcome",
                changes.len(),
                suite.cases.len()
            );
            Ok(if changes.is_empty() { 0 } else { EXIT_DENIED })
        }
        Command::Keygen { out } => {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| "no randomness".to_string())?;
            let keypair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| "generated key does not parse".to_string())?;
            use ring::signature::KeyPair;
            let spki = bundle::ed25519_spki(keypair.public_key().as_ref());
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
            let private =
                zeroize::Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref())));
            let path = out.join("priv.pem");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| {
                    format!("cannot create {} (it must not exist): {e}", path.display())
                })?;
            f.write_all(private.as_bytes()).map_err(|e| e.to_string())?;
            std::fs::write(
                out.join("pub.pem"),
                pem::encode(&pem::Pem::new("PUBLIC KEY", spki)),
            )
            .map_err(|e| e.to_string())?;
            println!("wrote {0}/priv.pem and {0}/pub.pem", out.display());
            Ok(0)
        }
        Command::Sign {
            deployment,
            image_trust,
            version,
            key,
            output,
        } => {
            let text = read(&deployment)?;
            let doc = deploy::parse(&text, &deployment.display().to_string())
                .map_err(|e| e.to_string())?;
            let trust_path = image_trust.unwrap_or_else(|| {
                deployment
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(&doc.image_trust_policy)
            });
            let trust = read(&trust_path)?;
            Policy::parse(trust.as_bytes(), &trust_path.display().to_string(), None)
                .map_err(|e| e.to_string())?;
            let private = zeroize::Zeroizing::new(
                std::fs::read(&key).map_err(|e| format!("cannot read {}: {e}", key.display()))?,
            );
            let signed = bundle::sign(
                &BundleContent {
                    version,
                    deployment: text,
                    image_trust: trust,
                },
                &private,
            )
            .map_err(|e| e.to_string())?;
            std::fs::write(&output, signed)
                .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
            println!("signed version {version} into {}", output.display());
            Ok(0)
        }
        Command::Verify {
            bundle: path,
            key,
            running,
        } => {
            let keys = trusted_keys(&key)?;
            let running = match running {
                Some(r) => {
                    let bytes = std::fs::read(&r)
                        .map_err(|e| format!("cannot read {}: {e}", r.display()))?;
                    Some(
                        bundle::verify(&bytes, &keys, None)
                            .map_err(|e| format!("running bundle {}: {e}", r.display()))?
                            .content,
                    )
                }
                None => None,
            };
            let bytes =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            match bundle::verify(&bytes, &keys, running.as_ref().map(|c| (c.version, c))) {
                Ok(b) => {
                    println!(
                        "ok: version {} signed by {}; {} tenants, {} key rules, {} IPU classes",
                        b.content.version,
                        b.signer,
                        b.deployment.tenants.len(),
                        b.deployment.keys.len(),
                        b.deployment.ipu_classes.len()
                    );
                    Ok(0)
                }
                Err(e) => {
                    println!("refused: {e}");
                    Ok(EXIT_DENIED)
                }
            }
        }
    }
}

fn load_deployment(path: &Path) -> Result<deploy::DeploymentPolicy, String> {
    deploy::parse(&read(path)?, &path.display().to_string()).map_err(|e| e.to_string())
}

fn check(policy: &Path, image: &str, json: bool) -> Result<u8, String> {
    let reference = ImageReference::parse(image).map_err(|e| e.to_string())?;
    let policy = Policy::from_file(policy).map_err(|e| e.to_string())?;
    let evaluation = policy.requirements_for(&reference);
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
        println!("{out}");
    } else {
        println!("image:        {reference}");
        println!("scope:        {}", evaluation.scope);
        for r in &requirements {
            println!("requirement:  {r}");
        }
        let words = match precheck {
            Precheck::Rejected => "rejected by policy",
            Precheck::AcceptedWithoutSignature => "accepted without signature verification",
            Precheck::SignatureRequired => "accepted only with a valid signature (checked at pull)",
        };
        println!("decision:     {words}");
    }
    Ok(if precheck == Precheck::Rejected {
        EXIT_DENIED
    } else {
        0
    })
}
