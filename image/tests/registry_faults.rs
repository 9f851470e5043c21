//! Range reads through a fault-injecting proxy in front of a real docker-registry:
//! 500s, 429 with Retry-After, connection resets and truncated bodies are retried;
//! a flipped bit is never returned as data; a registry that stays down fails in bounded
//! time with a clear error.

mod common;

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use lazy_erofs_image::blob::{BlobError, BlobReader};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryBlob, RegistryOptions, RetryPolicy};

#[derive(Debug, Clone, Copy)]
enum Fault {
    Status500,
    TooManyRequests,
    ResetMidBody,
    TruncatedBody,
    FlipBit,
}

/// A fault-injecting HTTP proxy (a named fake: a real registry cannot be told to fail
/// the next request). Faults apply, in order, to blob GETs; everything else passes.
struct FaultProxy {
    addr: String,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    injected: Arc<Mutex<Vec<Fault>>>,
}

impl FaultProxy {
    fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let injected: Arc<Mutex<Vec<Fault>>> = Arc::default();
        let (f, i) = (faults.clone(), injected.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (f, i, upstream) = (f.clone(), i.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &upstream, &f, &i);
                });
            }
        });
        Ok(Self {
            addr,
            faults,
            injected,
        })
    }

    fn queue(&self, faults: &[Fault]) {
        self.faults.lock().expect("lock").extend(faults);
    }
}

fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(stream.read(&mut byte)? == 1, "client closed");
        head.push(byte[0]);
    }
    Ok(head)
}

fn serve(
    mut client: TcpStream,
    upstream: &str,
    faults: &Mutex<VecDeque<Fault>>,
    injected: &Mutex<Vec<Fault>>,
) -> Result<()> {
    let head = read_head(&mut client)?;
    let is_blob_get = head.starts_with(b"GET ") && head.windows(7).any(|w| w == b"/blobs/");
    // One request per connection keeps the framing trivial.
    let mut request = head[..head.len() - 2].to_vec();
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&request)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    let fault = if is_blob_get {
        faults.lock().expect("lock").pop_front()
    } else {
        None
    };
    let Some(fault) = fault else {
        client.write_all(&response)?;
        return Ok(());
    };
    injected.lock().expect("lock").push(fault);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?
        + 4;
    let (headers, body) = response.split_at(split);
    match fault {
        Fault::Status500 => client.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?,
        Fault::TooManyRequests => client.write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?,
        Fault::ResetMidBody => {
            client.write_all(headers)?;
            client.write_all(&body[..body.len() / 2])?;
            // SO_LINGER 0: close with RST instead of FIN.
            nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 })?;
        }
        Fault::TruncatedBody => {
            client.write_all(headers)?;
            client.write_all(&body[..body.len().saturating_sub(100)])?;
        }
        Fault::FlipBit => {
            let mut body = body.to_vec();
            let middle = body.len() / 2;
            body[middle] ^= 0x10;
            client.write_all(headers)?;
            client.write_all(&body)?;
        }
    }
    Ok(())
}

struct Setup {
    _registry: lazy_erofs_test_support::DockerRegistry,
    proxy: FaultProxy,
    layer: LazyLayer,
    local: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let registry = lazy_erofs_test_support::start_docker_registry(dir.path(), None)?;
    let addr = registry.host.clone();
    let dst = common::converted_layout(dir.path())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let direct = Registry::new(&RegistryOptions {
        insecure_hosts: vec![addr.clone()],
        ..RegistryOptions::default()
    });
    runtime.block_on(direct.push_layout(&dst, &format!("{addr}/lazy/faults:1")))?;
    let (manifest, _) = runtime.block_on(direct.pull_manifest(&format!("{addr}/lazy/faults:1")))?;
    // The first layer holds a 3 MB file: several chunks.
    let layer = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
    let local = fs::read(dst.join("blobs/sha256").join(&layer.digest[7..]))?;
    Ok(Setup {
        _registry: registry,
        proxy: FaultProxy::start(addr)?,
        layer,
        local,
        _dir: dir,
    })
}

fn remote(s: &Setup, policy: RetryPolicy) -> Result<RegistryBlob> {
    let options = RegistryOptions {
        insecure_hosts: vec![s.proxy.addr.clone()],
        retry: policy,
        ..RegistryOptions::default()
    };
    Ok(RegistryBlob {
        runtime: Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?,
        ),
        registry: Arc::new(Registry::new(&options)),
        image: format!("{}/lazy/faults:1", s.proxy.addr),
        digest: s.layer.digest.clone(),
    })
}

#[test]
fn transient_faults_are_retried_and_retry_after_is_honoured() -> Result<()> {
    let s = setup()?;
    s.proxy.queue(&[
        Fault::Status500,
        Fault::TooManyRequests,
        Fault::ResetMidBody,
        Fault::TruncatedBody,
    ]);
    let started = Instant::now();
    let reader = BlobReader::open(
        remote(&s, RetryPolicy::default())?,
        &s.layer.verified_digest,
    )?;
    let local = BlobReader::open(&s.local[..], &s.layer.verified_digest)?;
    assert_eq!(
        s.proxy.injected.lock().expect("lock").len(),
        4,
        "every fault was served"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured ({:?})",
        started.elapsed()
    );
    let size = reader.header().data_space_size;
    assert_eq!(reader.read_data(0, size)?, local.read_data(0, size)?);
    Ok(())
}

#[test]
fn a_flipped_bit_is_never_returned_as_data() -> Result<()> {
    let s = setup()?;
    let reader = BlobReader::open(
        remote(&s, RetryPolicy::default())?,
        &s.layer.verified_digest,
    )?;
    s.proxy.queue(&[Fault::FlipBit]);
    let err = reader.chunk(1).expect_err("corrupted chunk returned");
    assert!(
        matches!(
            err,
            BlobError::ChunkDigest { index: 1 } | BlobError::Chunk { index: 1, .. }
        ),
        "{err}"
    );
    // The next fetch is clean and verifies.
    let local = BlobReader::open(&s.local[..], &s.layer.verified_digest)?;
    assert_eq!(reader.chunk(1)?, local.chunk(1)?);
    Ok(())
}

#[test]
fn a_registry_that_stays_down_fails_in_bounded_time() -> Result<()> {
    let s = setup()?;
    s.proxy.queue(&[Fault::Status500; 20]);
    let policy = RetryPolicy {
        max_attempts: 4,
        budget: Duration::from_secs(3),
        ..RetryPolicy::default()
    };
    let started = Instant::now();
    let err = BlobReader::open(remote(&s, policy)?, &s.layer.verified_digest)
        .err()
        .context("read succeeded")?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("500"), "{err}");
    assert_eq!(s.proxy.injected.lock().expect("lock").len(), 4, "attempts");
    Ok(())
}
