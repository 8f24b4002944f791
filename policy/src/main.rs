//! `policy`: inspect an image trust policy.
//!
//! Exit codes: 0 accepted or signature required, 3 rejected by policy, 1 operational error
//! (unreadable or invalid policy), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use policy::reference::ImageReference;
use policy::trust::Precheck;
use policy::Policy;

#[derive(Parser)]
#[command(name = "policy", version, about = "Image trust policy tools")]
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
}

fn main() -> ExitCode {
    let Command::Check {
        policy,
        image,
        json,
    } = Cli::parse().command;
    let reference = match ImageReference::parse(&image) {
        Ok(r) => r,
        Err(e) => return fail(json, &e.to_string()),
    };
    let policy = match Policy::from_file(&policy) {
        Ok(p) => p,
        Err(e) => return fail(json, &e.to_string()),
    };
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
    if precheck == Precheck::Rejected {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(json: bool, message: &str) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({ "error": message }));
    }
    eprintln!("policy: {message}");
    ExitCode::from(1)
}
