//! The lazy EROFS layer format: EROFS metadata writer, OCI layer conversion, chunk table
//! and verification, and the registry client. Not written yet; see DESIGN.md.
