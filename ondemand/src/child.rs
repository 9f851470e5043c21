//! The fetcher child process: receives its kernel-side fd from the supervisor (the
//! cachefiles device, writing `restore` when told to; or a fanotify broker link) and
//! serves until that fd or the supervisor goes away.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use nix::sys::signal::Signal;

use crate::cachefiles::device::Device;
use crate::fanotify::link::BrokerLink;
use crate::fault::{Fault, FaultTrigger};
use crate::fetcher::{self, FetcherConfig, FetcherParts, Resolver};
use crate::handover::{self, Backend, HandoverError, ToChild, ToParent};
use crate::source::{BlobSpec, RegistryCredentials, SourceFactory};
use crate::stats::{Counter, Stats};

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("connecting to the supervisor at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error("shared stats: {0}")]
    Stats(std::io::Error),
    #[error("writing restore: {0}")]
    Restore(#[source] crate::cachefiles::device::DeviceError),
    #[error("the supervisor is gone")]
    Orphaned,
    #[error("the supervisor speaks hand-over protocol {theirs}, this fetcher {ours}")]
    Protocol { theirs: u32, ours: u32 },
    #[error(transparent)]
    Fetcher(#[from] fetcher::FetcherError),
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
}

/// Asks the supervisor over the hand-over socket; one question at a time. Credentials
/// that come with an answer go to the sources' factory before the blob is opened.
struct SupervisorResolver {
    conn: tokio::sync::Mutex<Conn>,
    factory: Arc<dyn SourceFactory>,
}

struct Conn {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn ask(
        &mut self,
        domain: Option<&str>,
        cookie: &str,
    ) -> Result<Option<(BlobSpec, Option<RegistryCredentials>)>, HandoverError> {
        handover::write_line(
            &self.writer,
            &ToParent::Resolve {
                cookie: cookie.to_owned(),
                domain: domain.map(str::to_owned),
            },
        )?;
        Ok(match handover::read_line(&mut self.reader)? {
            ToChild::Blob { spec, credentials } => Some((spec, credentials)),
            ToChild::Unknown => None,
        })
    }
}

#[async_trait]
impl Resolver for SupervisorResolver {
    async fn resolve(
        &self,
        domain: Option<&str>,
        cookie: &str,
    ) -> Result<Option<BlobSpec>, String> {
        let mut conn = self.conn.lock().await;
        // Blocking I/O on a local socket answered from memory: microseconds, and OPENs
        // are rare (one per layer mount).
        let answer =
            tokio::task::block_in_place(|| conn.ask(domain, cookie)).map_err(|e| e.to_string())?;
        Ok(answer.map(|(spec, credentials)| {
            if let Some(credentials) = credentials {
                self.factory.provide_credentials(&credentials);
            }
            spec
        }))
    }
}

/// Entry point of the hidden `fetcher` subcommand.
/// `factory` makes the blob sources once the shared counters are mapped (so registry
/// requests can be counted in them).
pub fn run(
    socket: &Path,
    factory: impl FnOnce(&Arc<Stats>) -> Arc<dyn SourceFactory>,
    config: FetcherConfig,
) -> Result<(), ChildError> {
    // Die with the supervisor; if it is already gone, do not serve as an orphan.
    let parent = nix::unistd::getppid();
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != parent {
        return Err(ChildError::Orphaned);
    }
    // Fetch buffers (a unit, a readahead run) go back to the kernel when freed.
    if !crate::sys::unmap_large_blocks(1 << 20) {
        tracing::debug!("the allocator keeps its own threshold for mapped blocks");
    }
    let stream = UnixStream::connect(socket).map_err(|source| ChildError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let (handover, kernel_fd, stats_fd) = handover::recv_handover(&stream)?;
    if handover.protocol > handover::PROTOCOL {
        return Err(ChildError::Protocol {
            theirs: handover.protocol,
            ours: handover::PROTOCOL,
        });
    }
    let stats = Arc::new(Stats::from_fd(stats_fd).map_err(ChildError::Stats)?);
    let factory = factory(&stats);
    let device = match handover.backend {
        Backend::Cachefiles => {
            let device = Device::from_fd(kernel_fd);
            if handover.restore {
                device.restore().map_err(ChildError::Restore)?;
                stats.add(Counter::Restores, 1);
            }
            Kernelside::Cachefiles(Arc::new(device))
        }
        Backend::Fanotify => Kernelside::Fanotify(Arc::new(BrokerLink::new(kernel_fd))),
    };
    handover::write_line(
        &stream,
        &ToParent::Ready {
            pid: std::process::id(),
            restored: handover.restore,
        },
    )?;
    tracing::info!(
        generation = handover.generation,
        restored = handover.restore,
        "fetcher serving"
    );

    let reader = stream.try_clone().map_err(HandoverError::Io)?;
    let conn = Conn {
        writer: stream,
        reader: BufReader::new(reader),
    };
    let resolver = Arc::new(SupervisorResolver {
        conn: tokio::sync::Mutex::new(conn),
        factory: factory.clone(),
    });
    let faults = Arc::new(FaultTrigger::new(Fault::from_env()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(ChildError::Runtime)?;
    let shared: Shared = (resolver, factory, stats, faults, config);
    match device {
        Kernelside::Cachefiles(device) => {
            runtime.block_on(fetcher::serve(parts(device, shared)))?
        }
        Kernelside::Fanotify(device) => runtime.block_on(fetcher::serve(parts(device, shared)))?,
    }
    Ok(())
}

/// What a fetcher is given besides its kernel.
type Shared = (
    Arc<dyn Resolver>,
    Arc<dyn SourceFactory>,
    Arc<Stats>,
    Arc<FaultTrigger>,
    FetcherConfig,
);

fn parts<K>(device: Arc<K>, (resolver, factory, stats, faults, config): Shared) -> FetcherParts<K> {
    FetcherParts {
        device,
        resolver,
        factory,
        stats,
        faults,
        config,
    }
}

/// The kernel the fetcher serves, by backend.
enum Kernelside {
    Cachefiles(Arc<Device>),
    Fanotify(Arc<BrokerLink>),
}
