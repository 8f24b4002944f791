fn main() {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        // A layer's blob and plaintext as `Bytes`: decoded without a copy out of the transport's
        // buffer (200 MB layers cross the API in 1 MiB messages, each way).
        .bytes([
            ".ipu.imagesvc.v1.DecryptLayerRequest.data",
            ".ipu.imagesvc.v1.DecryptLayerResponse.data",
        ])
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
