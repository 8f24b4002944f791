//! IPU image service: pull, verify, decrypt, unpack and build the rootfs.
