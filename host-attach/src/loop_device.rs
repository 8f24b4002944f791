//! Loop devices through the kernel's ioctls, as `losetup --find --show FILE` and
//! `losetup -d DEV` do, without starting a process for each (a cold start paid about 2 ms
//! for it).
//!
//! No crate here: `loopdev` generates its bindings with bindgen (libclang at build time) for
//! three ioctls and one struct, which are a stable kernel ABI (`linux/loop.h`).
//! `LOOP_CONFIGURE` needs Linux 5.8 (Debian 12 ships 6.1).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `linux/loop.h`.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Another process may take the free device between our asking and our configuring it
/// (`EBUSY`); losetup retries too.
const ATTEMPTS: usize = 16;

/// Attaches `file` (read-write) to a free loop device; the device's path.
pub fn attach(file: &Path) -> io::Result<PathBuf> {
    let backing = OpenOptions::new().read(true).write(true).open(file)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1;
        // `control` is an open descriptor for the duration of the call.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(d) => d,
            // udev may not have made the node yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        };
        // The name shown in /sys/block/loopN/loop/backing_file is the kernel's own; this one
        // is what `losetup --list` shows for older tools (truncated like losetup does).
        let name = file.as_os_str().as_encoded_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `LoopConfig` lays out
        // with repr(C) exactly as linux/loop.h; `config` outlives the call and the kernel
        // keeps no pointer to it (it takes its own reference to the backing file).
        let r = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE,
                &config as *const LoopConfig,
            )
        };
        if r == 0 {
            return Ok(path);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free loop device")))
}

/// Detaches the loop device at `device` from its backing file.
pub fn detach(device: &Path) -> io::Result<()> {
    let file = File::open(device)?;
    // SAFETY: LOOP_CLR_FD takes no argument; `file` is open for the duration of the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets how far the kernel reads ahead on `device` when a file on it is read
/// (`/sys/block/<device>/queue/read_ahead_kb`).
pub fn set_read_ahead(device: &Path, kib: u32) -> io::Result<()> {
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("{} names no device", device.display())))?;
    std::fs::write(
        format!("/sys/block/{name}/queue/read_ahead_kb"),
        kib.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ABI size the kernel expects (`sizeof(struct loop_config)` is 304 on every Linux
    /// architecture).
    #[test]
    fn the_structs_have_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    /// A file attached, read back through the device, detached (root: loop devices).
    #[test]
    fn a_file_reads_back_through_its_loop_device_until_detached() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root for loop devices");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("backing");
        let content: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&file, &content).unwrap();
        let device = attach(&file).unwrap();
        let backing = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/backing_file",
            device.file_name().unwrap().to_str().unwrap()
        ))
        .unwrap();
        assert_eq!(backing.trim(), file.to_str().unwrap());
        let read_ahead = || {
            std::fs::read_to_string(format!(
                "/sys/block/{}/queue/read_ahead_kb",
                device.file_name().unwrap().to_str().unwrap()
            ))
            .unwrap()
        };
        set_read_ahead(&device, 1024).unwrap();
        assert_eq!(read_ahead().trim(), "1024");
        set_read_ahead(&device, 256).unwrap();
        assert_eq!(read_ahead().trim(), "256");
        assert_eq!(std::fs::read(&device).unwrap(), content);
        detach(&device).unwrap();
        // Detached: the device reads as empty again, and a second detach is refused.
        assert_eq!(std::fs::read(&device).unwrap().len(), 0);
        let again = detach(&device).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::ENXIO), "{again}");
    }
}
