//! A fault-injecting HTTP proxy in front of a real registry (a named fake: a real
//! registry cannot be told to fail the next request). Faults apply, in order, to blob
//! GETs (or to every blob GET while a standing fault is set); everything else passes.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status500,
    TooManyRequests,
    ResetMidBody,
    TruncatedBody,
    FlipBit,
    /// The headers, then one body byte every [`TRICKLE_EVERY`]: a registry that stalls
    /// without ever closing.
    Trickle,
}

pub const TRICKLE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

pub struct FaultProxy {
    /// `127.0.0.1:PORT`
    pub addr: String,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    standing: Arc<Mutex<Option<Fault>>>,
    injected: Arc<Mutex<Vec<Fault>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FaultProxy {
    pub fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let proxy = Self {
            addr,
            faults: Arc::default(),
            standing: Arc::default(),
            injected: Arc::default(),
        };
        let (f, s, i) = (
            proxy.faults.clone(),
            proxy.standing.clone(),
            proxy.injected.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (f, s, i, upstream) = (f.clone(), s.clone(), i.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &upstream, &f, &s, &i);
                });
            }
        });
        Ok(proxy)
    }

    /// Faults for the next blob GETs, one each, in order.
    pub fn queue(&self, faults: &[Fault]) {
        lock(&self.faults).extend(faults);
    }

    /// A fault for every blob GET until cleared (`None`).
    pub fn set_standing(&self, fault: Option<Fault>) {
        *lock(&self.standing) = fault;
    }

    /// The faults injected so far.
    pub fn injected(&self) -> Vec<Fault> {
        lock(&self.injected).clone()
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
    standing: &Mutex<Option<Fault>>,
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
        lock(faults).pop_front().or(*lock(standing))
    } else {
        None
    };
    let Some(fault) = fault else {
        client.write_all(&response)?;
        return Ok(());
    };
    lock(injected).push(fault);
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
        Fault::Trickle => {
            client.write_all(headers)?;
            for byte in body {
                std::thread::sleep(TRICKLE_EVERY);
                client.write_all(std::slice::from_ref(byte))?;
            }
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
