//! The fanotify pre-content backend (Linux 6.14+, and the only one after 7.2): each lazy
//! layer is a file-backed EROFS mount whose metadata image is local and complete, and
//! whose data space is a sparse file beside it, filled on demand.
//!
//! - [`group`]: the fanotify group, marks, events and answers.
//! - [`broker`]: the supervisor-side owner of the group; brokers events to the fetcher
//!   child and re-sends what a dead child held.
//! - [`link`]: the broker ↔ fetcher packets; the child's side is a fetcher `Kernel`.
//! - [`present`]: the durable record of which pages are fetched.
//! - [`layer`]: a layer's files on disk and its mount.
//! - [`keeper`]: holds the group when the broker is gone, so nothing fails open.

pub mod broker;
pub mod group;
pub mod keeper;
pub mod layer;
pub mod link;
pub mod present;

pub use broker::{Broker, BrokerConfig, BrokerError, BrokerSummary, LayerFiles};
pub use group::{Group, GroupError};
