//! What a front end hears of a request as the stages establish it: progress for a bar or
//! logs, and the typed facts a report is built from (the CLI's [`crate::report`]). Every
//! method has a no-op default.

use std::path::Path;

use policy::reference::Digest;

use crate::build::LayerOutcome;
use crate::fetch::ResolvedImage;
use crate::rootfs::RootfsImage;
use crate::verify::{Admission, PolicyDecision, VerifiedImage};

pub trait Progress: Sync {
    fn stage(&self, _message: &str) {}
    /// `done` of `total` bytes of `label`.
    fn bytes(&self, _label: &str, _done: u64, _total: u64) {}
    fn finish_bytes(&self) {}

    /// The deployment policy admitted the request.
    fn admitted(&self, _admission: &Admission) {}
    /// Where the image is read from.
    fn source(&self, _description: &str) {}
    /// The manifest the reference names, and the platform manifest selected from it.
    fn resolved(&self, _manifest: &Digest, _platform_manifest: &Digest) {}
    /// The trust policy decided (allowed or not).
    fn policy(&self, _decision: &PolicyDecision) {}
    /// The config was loaded (digest-checked), before the image requirements are checked.
    fn config(&self, _image: &ResolvedImage) {}
    /// The verify stage accepted the image.
    fn verified(&self, _image: &VerifiedImage) {}
    /// Layer `index`'s blob is in the verified cache at `path`.
    fn pulled(&self, _index: usize, _path: &Path) {}
    /// Layer `index` was applied to the image's file system.
    fn unpacked(&self, _index: usize, _outcome: &LayerOutcome) {}
    /// The ext4 image was built.
    fn built(&self, _rootfs: &RootfsImage) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

/// A progress bar for long pulls on stderr (hidden when not a terminal or when quiet);
/// stages go to the debug log.
pub struct TerminalProgress {
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
    quiet: bool,
}

impl TerminalProgress {
    pub fn new(quiet: bool) -> Self {
        Self {
            bar: std::sync::Mutex::new(None),
            quiet,
        }
    }
}

impl Progress for TerminalProgress {
    fn stage(&self, message: &str) {
        tracing::debug!("{message}");
    }

    fn bytes(&self, label: &str, done: u64, total: u64) {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        if self.quiet {
            return;
        }
        let mut guard = self.bar.lock().expect("progress lock");
        let bar = guard.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
    }

    fn finish_bytes(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}
