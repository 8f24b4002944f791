//! `ipu-image-svc`: verify, pull and unpack confidential images; serve per-function clones.
//! The command line and its dispatch are [`ipu_image_svc::cmdline`] (in the library, so that `xtask`
//! renders man pages and shell completions from the same definition).

fn main() -> std::process::ExitCode {
    ipu_image_svc::cmdline::main()
}
