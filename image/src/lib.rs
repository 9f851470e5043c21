//! The lazy EROFS image format.
//!
//! - [`erofs`]: an EROFS metadata writer: a filesystem tree in, a metadata image out,
//!   whose regular files point into a separate data device (the layer's data space).
//! - [`blob`]: the lazy layer blob (header, metadata, chunk table, compressed chunks),
//!   its writer and its verifying ranged reader.
//! - [`convert`]: an OCI layer tar (plain, gzip, zstd) to a lazy layer blob, in one pass.
//!
//! Still to come (see DESIGN.md): whole-image conversion and the registry client.

pub mod blob;
pub mod convert;
pub mod erofs;
