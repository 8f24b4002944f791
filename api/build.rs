fn main() {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .compile_protos(
            &[
                "proto/audit.proto",
                "proto/keybroker.proto",
                "proto/keyprovider.proto",
                "proto/imagesvc.proto",
                "proto/containerd_diff.proto",
            ],
            &["proto"],
        )
        .expect("protoc (apt install protobuf-compiler; scripts/setup.sh does)");
}
