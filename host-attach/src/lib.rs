//! Host side: attaches an exported clone, runs the function with runc, and
//! the containerd decrypt hook.
//!
//! Not built yet: issues 6 and 7 fill this crate.
