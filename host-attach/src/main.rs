//! `host-attach run`: start one function from an image through the IPU, and clean up.
//!
//! Prepare on the IPU, attach and mount the exported clone, write the OCI bundle, `runc run`
//! with this terminal's output, then (also after Ctrl-C, SIGTERM or a crashed function)
//! unmount, detach and Teardown. The exit code is the function's.
//!
//! Exit codes: the function's own; 125 when the function could not be started; 2 usage.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use api::imagesvc::image_service_client::ImageServiceClient;
use api::imagesvc::{PrepareRequest, TeardownRequest, VerifyRequest};
use clap::{Parser, Subcommand};
use host_attach::attach::{Attachment, Export};
use host_attach::bundle::{config, Process};
use host_attach::ipu::IpuApi;

const EXIT_NOT_STARTED: u8 = 125;
/// `verify` refused or failed.
const EXIT_VERIFY_FAILED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "host-attach",
    version,
    about = "Host agent: run functions from IPU-prepared images"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run a function from an image: Prepare, attach, mount, runc, and tear down at exit.
    Run(RunArgs),
    /// Have the IPU verify an image for a tenant and function (policy, signature, layer keys
    /// released), so that containerd's decrypt hook (`ipu-decrypt-hook`) may then have its
    /// layers decrypted: run before `ctr pull` of an encrypted image.
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    ipu: IpuApi,
    /// The image reference (docker://... or oci:DIR:TAG).
    image: String,
}

/// A runtime for this process's few calls, and a client of ipu-image-svc's API.
fn connect(
    ipu: &IpuApi,
) -> Result<
    (
        tokio::runtime::Runtime,
        ImageServiceClient<tonic::transport::Channel>,
    ),
    String,
> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = rt.block_on(ipu.connect())?;
    Ok((rt, client))
}

/// `host-attach verify`: prints the manifest digest and the layers.
fn verify(args: &VerifyArgs) -> Result<(), String> {
    let (rt, mut client) = connect(&args.ipu)?;
    rt.block_on(async {
        let verified = client
            .verify(VerifyRequest {
                tenant: args.ipu.tenant.clone(),
                function: args.ipu.function.clone(),
                image: args.image.clone(),
            })
            .await
            .map_err(|s| format!("Verify: {}", s.message()))?
            .into_inner();
        println!("verified {} {}", args.image, verified.manifest_digest);
        for layer in verified.layers {
            println!("  layer {layer}");
        }
        Ok(())
    })
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    ipu: IpuApi,
    /// Where mounts and the bundle are made (default: a new directory under /run).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// For exports over TCP: this host agent's TLS files (`ca-cert.pem`, the CA of the
    /// IPU's export certificate; `client-cert.pem` and `client-key.pem`, its own).
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// The image reference (docker://... or oci:DIR:TAG).
    image: String,
    /// The command to run instead of the image's Cmd.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Top::Run(args) => args,
        Top::Verify(args) => {
            return match verify(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("host-attach: {e}");
                    ExitCode::from(EXIT_VERIFY_FAILED)
                }
            };
        }
    };
    // Ctrl-C and SIGTERM mark that the run is ending: the function gets SIGTERM (through
    // runc, which forwards it), then SIGKILL after a grace period, and cleanup still happens.
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, interrupted.clone()) {
            eprintln!("host-attach: cannot handle signal {sig}: {e}");
            return ExitCode::from(EXIT_NOT_STARTED);
        }
    }
    match run(&args, &interrupted) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("host-attach: {e}");
            ExitCode::from(EXIT_NOT_STARTED)
        }
    }
}

fn run(args: &RunArgs, interrupted: &AtomicBool) -> Result<u8, String> {
    let (rt, mut client) = connect(&args.ipu)?;
    let prepared = rt
        .block_on(client.prepare(PrepareRequest {
            tenant: args.ipu.tenant.clone(),
            function: args.ipu.function.clone(),
            image: args.image.clone(),
        }))
        .map_err(|s| format!("Prepare: {}", s.message()))?
        .into_inner();
    let teardown = |client: &mut ImageServiceClient<_>| {
        rt.block_on(client.teardown(TeardownRequest {
            clone_id: prepared.clone_id.clone(),
        }))
        .map_err(|s| format!("Teardown of {}: {}", prepared.clone_id, s.message()))
    };
    let workdir = args
        .workdir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/host-attach").join(&prepared.clone_id));
    let result = if interrupted.load(Ordering::SeqCst) {
        Err("interrupted before the function started".to_string())
    } else {
        export_of(&prepared, args.tls_certificates.as_deref()).and_then(|export| {
            start_and_wait(&prepared, &export, &workdir, &args.command, interrupted)
        })
    };
    // Whatever happened, the clone goes: the IPU erases it.
    let torn_down = teardown(&mut client);
    let _ = std::fs::remove_dir_all(&workdir);
    let code = result?;
    torn_down?;
    Ok(code)
}

/// Where the export is: its Unix socket, or its TCP address with this agent's TLS files.
fn export_of(
    prepared: &api::imagesvc::PrepareResponse,
    tls_certificates: Option<&std::path::Path>,
) -> Result<Export, String> {
    let name = prepared.export_name.clone();
    if prepared.address.is_empty() {
        return Ok(Export::Unix {
            socket: PathBuf::from(&prepared.socket),
            name,
        });
    }
    let address: std::net::SocketAddr = prepared
        .address
        .parse()
        .map_err(|e| format!("export address {:?}: {e}", prepared.address))?;
    let certificates = tls_certificates.ok_or_else(|| {
        format!(
            "the export is on {} (TLS): --tls-certificates DIR is needed",
            prepared.address
        )
    })?;
    Ok(Export::Tls {
        host: address.ip().to_string(),
        port: address.port(),
        name,
        certificates: certificates.to_path_buf(),
    })
}

fn start_and_wait(
    prepared: &api::imagesvc::PrepareResponse,
    export: &Export,
    workdir: &std::path::Path,
    command: &[String],
    interrupted: &AtomicBool,
) -> Result<u8, String> {
    std::fs::create_dir_all(workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let rootfs = workdir.join("rootfs");
    let mut attachment = Attachment::attach(export, workdir, &rootfs)?;
    let image_config: serde_json::Value = if prepared.runtime_config_json.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&prepared.runtime_config_json)
            .map_err(|e| format!("the image's runtime config: {e}"))?
    };
    let outcome = (|| {
        let process = Process::from_image(&image_config, command, &rootfs)?;
        let bundle = workdir.join("bundle");
        std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config(&process, &rootfs, "function")).expect("json"),
        )
        .map_err(|e| e.to_string())?;
        let runc_root = workdir.join("runc");
        let mut runc = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&prepared.clone_id)
            .spawn()
            .map_err(|e| format!("runc: {e}"))?;
        let status = wait_forwarding_stop(&mut runc, &runc_root, &prepared.clone_id, interrupted)?;
        Ok::<u8, String>(match status.code() {
            Some(c) => c as u8,
            None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0) as u8,
        })
    })();
    let detached = attachment.detach();
    let code = outcome?;
    detached?;
    Ok(code)
}

/// How long a function has to exit after SIGTERM before it is killed.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for `runc run`; once the run is interrupted, sends it SIGTERM (runc passes it to the
/// function), and SIGKILLs every process of the container when the grace period is over.
fn wait_forwarding_stop(
    runc: &mut std::process::Child,
    runc_root: &std::path::Path,
    id: &str,
    interrupted: &AtomicBool,
) -> Result<std::process::ExitStatus, String> {
    let mut stopping_since: Option<std::time::Instant> = None;
    let mut killed = false;
    loop {
        if let Some(status) = runc.try_wait().map_err(|e| format!("runc: {e}"))? {
            return Ok(status);
        }
        match stopping_since {
            None if interrupted.load(Ordering::SeqCst) => {
                // SAFETY: kill(2) on our own child, which has not been reaped (try_wait
                // above returned None), so its pid is still its own.
                unsafe { libc::kill(runc.id() as i32, libc::SIGTERM) };
                stopping_since = Some(std::time::Instant::now());
            }
            Some(since) if !killed && since.elapsed() >= STOP_GRACE => {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(runc_root)
                    .args(["kill", "--all", id, "KILL"])
                    .status();
                killed = true;
            }
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
