//! Host side of a function start: attach the clone the IPU exports (a FUSE file this process
//! serves from the NBD export, and a loop device over it), mount it, write a hardened OCI runtime bundle from
//! the image config, run it with runc, and undo all of it at exit; or (`run --vm`) boot a
//! microVM whose disk is the clone, served by the IPU as a vhost-user-blk device. No key and no broker
//! session ever reaches this process: it sees a block device.
//!
//! The containerd decrypt hook (`ipu-decrypt-hook`) lives here too: it streams
//! encrypted layers to the IPU and plaintext back, and `payload` reads what containerd passes
//! it.
//!
//! The binaries' command lines ([`cmdline`], [`hook_cmdline`]) only parse their arguments and
//! call [`run`], [`verify`] or [`hook`]; [`exit`] maps the outcomes to exit codes.
//!
//! - [`attach`]: the export attached (served here, or by qemu-storage-daemon for TLS), a loop
//!   device, the file system grown to the clone, mounted; undone in reverse order.
//! - [`nbd_client`]: the NBD client; [`fuse_file`]: its export as a file in a FUSE mount.
//! - [`loop_device`]: loop devices attached and detached through the kernel's ioctls.
//! - [`bundle`]: the hardened OCI runtime config (namespaces, no capabilities, seccomp).
//! - [`runc`]: the bundle written and run; a stop passed on.
//! - [`microvm`]: `run --vm`: the function in a QEMU microVM, the clone a hot-plugged
//!   vhost-user-blk-pci device; its initramfs and the QMP client.
//! - [`run`]: `host-attach run` from Prepare to Teardown; [`verify`]: `host-attach verify`.
//! - [`hook`]: containerd's stream processor; [`payload`]: what containerd passes on fd 3.
//! - [`ipu`]: the IPU's API socket, tenant and function, and the connection.
//! - [`exit`]: exit codes and the one stderr line of each failure.

pub mod attach;
pub mod bundle;
pub mod cmdline;
pub mod exit;
pub mod fuse_file;
pub mod hook;
pub mod hook_cmdline;
pub mod ipu;
pub mod loop_device;
pub mod microvm;
pub mod nbd_client;
pub mod payload;
pub mod run;
pub mod runc;
pub mod verify;
