use std::path::PathBuf;
use std::process::Command;

/// The last released contract; `src/compat.rs` checks the current one against it.
const RELEASED: &str = "released/0.1";
const CONTRACT: &str = "nimbus/v1/nimbus.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Needs `protoc` on PATH (Debian: protobuf-compiler) or PROTOC set.
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("nimbus.binpb"))
        .compile_protos(&[format!("proto/{CONTRACT}").as_str()], &["proto"])?;
    let protoc = std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into());
    let status = Command::new(&protoc)
        .arg(format!("-I{RELEASED}"))
        .arg(format!("--descriptor_set_out={}", out.join("released.binpb").display()))
        .arg(CONTRACT)
        .status()
        .map_err(|e| format!("cannot run {protoc} for the released contract: {e}; install protobuf-compiler"))?;
    if !status.success() {
        return Err(format!("{protoc} failed on {RELEASED}/{CONTRACT}: {status}").into());
    }
    println!("cargo:rerun-if-changed=proto/{CONTRACT}");
    println!("cargo:rerun-if-changed={RELEASED}/{CONTRACT}");
    Ok(())
}
