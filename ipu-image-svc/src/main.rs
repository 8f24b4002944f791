fn main() {
    eprintln!("ipu-image-svc: not built yet");
    std::process::exit(1);
}
