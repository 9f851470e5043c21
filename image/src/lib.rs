//! The lazy EROFS image format.
//!
//! - [`erofs`]: an EROFS metadata writer: a filesystem tree in, a metadata image out,
//!   whose regular files point into a separate data device (the layer's data space).
//! - [`blob`]: the lazy layer blob (header, metadata, chunk table, compressed chunks),
//!   its writer and its verifying ranged reader.
//! - [`convert`]: an OCI layer tar (plain, gzip, zstd) to a lazy layer blob, in one pass.
//!
//!   [`convert::convert_layout`] converts a whole image between OCI image layouts.
//! - [`manifest`]: how converted manifests mark lazy layers (media type, annotations).
//! - [`oci_layout`]: OCI image layout directories.
//! - [`registry`]: push, manifest pull and range reads against an OCI registry.

pub mod blob;
pub mod convert;
pub mod erofs;
pub mod manifest;
pub mod oci_layout;
pub mod registry;
