//! Generates the connmeta.v1 client stubs from proto/ at build time: in the
//! repository a symlink to ../../proto, in the published package (cargo
//! package follows the link) a copy of it.
//!
//! protoc comes from the protoc-bin-vendored crate so that a fresh machine with
//! nothing but cargo and crates.io can build this crate; set PROTOC to use
//! another protoc (for instance grpcio-tools' bundled one) instead.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from("proto");
    // Every file of the package, so a new service needs no edit here.
    let mut protos: Vec<PathBuf> = std::fs::read_dir(proto_root.join("connmeta/v1"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    protos.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    protos.sort(); // read_dir order is arbitrary; keep builds reproducible

    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    // The well-known types (Timestamp, FieldMask) ship beside the vendored
    // protoc; prost maps them to prost-types rather than generating them.
    let wkt = protoc_bin_vendored::include_path()?;

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        // This crate is a client; the server is the Python sidecar.
        .build_server(false)
        .compile_with_config(config, &protos, &[proto_root.clone(), wkt])?;

    // compile_with_config already emits rerun-if-changed per proto file; also
    // watch the directory so an added file triggers a rebuild.
    println!(
        "cargo:rerun-if-changed={}",
        proto_root.join("connmeta/v1").display()
    );
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
