//! The containerd Snapshots service: metadata store, overlay and EROFS mounts, restart
//! recovery, garbage collection. Not written yet; see DESIGN.md.
