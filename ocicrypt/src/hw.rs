//! Which CPU crypto instructions the layer cipher uses.
//!
//! The RustCrypto backends pick their implementation at run time: `aes` uses AES-NI when the
//! CPU has it (it has no VAES code path in this version), `sha2` uses SHA-NI. VAES is reported
//! as present-but-unused so the log never claims more than the code does.

use std::fmt;
use std::sync::Once;

cpufeatures::new!(cpu_aesni, "aes", "sse2");
cpufeatures::new!(cpu_shani, "sha", "sse2", "ssse3", "sse4.1");

/// Hardware acceleration available and used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HwAccel {
    /// AES-NI present (and used by the AES-CTR backend).
    pub aes_ni: bool,
    /// VAES present. The AES backend does not use it.
    pub vaes: bool,
    /// SHA-NI present (and used by SHA-256 / HMAC-SHA256).
    pub sha_ni: bool,
}

pub fn hardware_acceleration() -> HwAccel {
    HwAccel {
        aes_ni: cpu_aesni::get(),
        vaes: vaes_present(),
        sha_ni: cpu_shani::get(),
    }
}

#[cfg(target_arch = "x86_64")]
fn vaes_present() -> bool {
    std::arch::is_x86_feature_detected!("vaes")
}

#[cfg(not(target_arch = "x86_64"))]
fn vaes_present() -> bool {
    false
}

impl fmt::Display for HwAccel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b: bool| if b { "in use" } else { "not available" };
        write!(
            f,
            "AES-NI {}, VAES {}, SHA-NI {}",
            yn(self.aes_ni),
            if self.vaes {
                "available but not used by the AES backend"
            } else {
                "not available"
            },
            yn(self.sha_ni)
        )
    }
}

static LOG: Once = Once::new();

pub(crate) fn log_hardware_once() {
    LOG.call_once(
        || tracing::info!(target: "ocicrypt", "layer cipher hardware: {}", hardware_acceleration()),
    );
}
