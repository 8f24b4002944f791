//! OCI layer encryption, compatible with Go ocicrypt. See the crate README.
