//! The lazy EROFS image format.
//!
//! - [`erofs`]: an EROFS metadata writer: a filesystem tree in, a metadata image out,
//!   whose regular files point into a separate data device (the layer's data space).
//!
//! Still to come (see DESIGN.md): the lazy layer blob (header, chunk table, compressed
//! chunks), the OCI tar converter and the registry client.

pub mod erofs;
