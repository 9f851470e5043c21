//! Lazy layers: what the fetcher serves to the kernel for a lazy EROFS layer in a
//! registry — its verified metadata image and its data space, read by range.

mod source;

pub use source::{LazyLayerSpec, LazySourceFactory, View};
