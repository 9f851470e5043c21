//! The containerd Snapshots service: the snapshotter interface (`api`), the redb
//! metadata store (`store`), ordinary overlay layers (`overlay`), containerd's list
//! filters and label rules, the gRPC server on a Unix socket (`grpc`, `server`), and the
//! fetcher's source for lazy layers in a registry (`lazy`), the kubelet's image
//! service proxy that keeps pull credentials for lazy reads (`cri`), and the client side
//! of a lazy pull into containerd (`pull`).

pub mod admin;
pub mod api;
pub mod cache;
pub mod cri;
pub mod filter;
pub mod grpc;
pub mod labels;
pub mod lazy;
pub mod metrics;
pub mod overlay;
pub mod pull;
pub mod server;
pub mod store;
