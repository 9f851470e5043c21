//! Generates the containerd Snapshots gRPC server (only the server: message types come
//! from containerd-client, so both sides share one set of types) and our Admin service
//! (server and client: `lazy-erofs status` speaks it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto";
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(
            ".containerd.services.snapshots.v1",
            "::containerd_client::services::v1::snapshots",
        )
        .extern_path(".containerd.types", "::containerd_client::types")
        .compile_protos(&[proto], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/lazyerofs/admin/v1/admin.proto"], &["proto"])?;
    Ok(())
}
