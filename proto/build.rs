fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Needs `protoc` on PATH (Debian: protobuf-compiler) or PROTOC set.
    tonic_prost_build::configure().compile_protos(&["proto/nimbus/v1/nimbus.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/nimbus/v1/nimbus.proto");
    Ok(())
}
