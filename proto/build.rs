fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps `cargo build` free of system packages.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    #[allow(clippy::disallowed_methods)] // a build script's own process, one thread
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .bytes(".dglrun.v1.Chunk.data")
        .bytes(".dglrun.v1.SessionInput")
        .bytes(".dglrun.v1.SessionOutput")
        .compile_protos(&["proto/dglrun.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/dglrun.proto");
    Ok(())
}
