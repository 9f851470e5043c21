//! A hostile registry (a named fake: no real registry sends endless manifests or token
//! replies) against the registry client: every size it claims or sends is bounded
//! before it is allocated, the error says which limit, and the client stops reading —
//! the fake counts what it managed to send before the client hung up.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use lazy_erofs_image::registry::{
    MAX_DOCUMENT_BYTES, MAX_TOKEN_REPLY_BYTES, Registry, RegistryOptions, RetryPolicy,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Play {
    /// A manifest whose Content-Length is 100 MB.
    DeclaredHugeManifest,
    /// A manifest sent chunked, without end.
    EndlessManifest,
    /// `/v2/` asks for a bearer token; the token service answers without end.
    EndlessToken,
    /// The token reply's token would split the Authorization header.
    HeaderSplittingToken,
    /// A small valid manifest whose config claims to be 1 TiB.
    HugeConfig,
}

struct Hostile {
    addr: String,
    sent: Arc<AtomicU64>,
}

const CONFIG_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

fn manifest() -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CONFIG_DIGEST}","size":{}}},"layers":[]}}"#,
        1u64 << 40
    )
}

impl Hostile {
    fn start(play: Play) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let (counter, me) = (sent.clone(), addr.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (counter, me) = (counter.clone(), me.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, play, &me, &counter);
                });
            }
        });
        Ok(Self { addr, sent })
    }

    fn registry(&self) -> Registry {
        Registry::new(&RegistryOptions {
            insecure_hosts: vec![self.addr.clone()],
            docker_config: false,
            retry: RetryPolicy {
                budget: Duration::from_secs(5),
                ..RetryPolicy::default()
            },
            ..RegistryOptions::default()
        })
    }
}

fn serve(stream: TcpStream, play: Play, me: &str, sent: &AtomicU64) -> std::io::Result<()> {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let mut out = &stream;
    let token_play = matches!(play, Play::EndlessToken | Play::HeaderSplittingToken);
    if path == "/v2/" && token_play {
        return write!(
            out,
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"hostile\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    if path == "/v2/" {
        return write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    let chunk = vec![b' '; 64 << 10];
    let endless = |mut out: &TcpStream, head: &str| -> std::io::Result<()> {
        out.write_all(head.as_bytes())?;
        loop {
            write!(out, "{:x}\r\n", chunk.len())?;
            out.write_all(&chunk)?;
            out.write_all(b"\r\n")?;
            sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
    };
    const CHUNKED: &str = "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let manifest_head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n";
    match (play, path.starts_with("/token")) {
        (Play::EndlessToken, true) => endless(out, &format!("HTTP/1.1 200 OK\r\n{CHUNKED}")),
        (Play::HeaderSplittingToken, true) => {
            let body = r#"{"token":"abc\r\nX-Injected: 1"}"#;
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        (Play::DeclaredHugeManifest, _) => {
            write!(
                out,
                "{manifest_head}Content-Length: 100000000\r\nConnection: close\r\n\r\n"
            )?;
            loop {
                out.write_all(&chunk)?;
                sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
        (Play::EndlessManifest, _) => endless(out, &format!("{manifest_head}{CHUNKED}")),
        (Play::HugeConfig, _) if path.contains("/manifests/") => {
            let body = manifest();
            write!(
                out,
                "{manifest_head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        // Anything else (a blob GET): as endless as the rest.
        _ => endless(out, &format!("HTTP/1.1 200 OK\r\n{CHUNKED}")),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Pulls `play`'s manifest; returns the error text, how long it took and what the fake
/// sent.
fn pull_manifest(play: Play) -> Result<(String, Duration, u64)> {
    let hostile = Hostile::start(play)?;
    let started = Instant::now();
    let err = runtime()?
        .block_on(
            hostile
                .registry()
                .pull_manifest(&format!("{}/evil/app:1", hostile.addr)),
        )
        .expect_err("the hostile manifest was accepted");
    // Let the fake notice the hang-up.
    std::thread::sleep(Duration::from_millis(200));
    Ok((
        format!("{err:#}"),
        started.elapsed(),
        hostile.sent.load(Ordering::SeqCst),
    ))
}

#[test]
fn a_manifest_declared_too_large_is_refused_unread() -> Result<()> {
    let (err, took, sent) = pull_manifest(Play::DeclaredHugeManifest)?;
    assert!(
        err.contains("manifests are limited to 4194304 bytes"),
        "{err}"
    );
    assert!(err.contains("100000000"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The socket buffers take a few MiB at most; 100 MB were offered.
    assert!(sent < 4 * MAX_DOCUMENT_BYTES, "{sent} bytes sent");
    Ok(())
}

#[test]
fn an_endless_manifest_is_cut_at_the_limit() -> Result<()> {
    let (err, took, sent) = pull_manifest(Play::EndlessManifest)?;
    assert!(
        err.contains("manifests are limited to 4194304 bytes"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(sent < 4 * MAX_DOCUMENT_BYTES, "{sent} bytes sent");
    Ok(())
}

#[test]
fn an_endless_token_reply_is_cut_at_the_limit() -> Result<()> {
    let (err, took, sent) = pull_manifest(Play::EndlessToken)?;
    assert!(
        err.contains("token replies are limited to 1048576 bytes"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(sent < 8 * MAX_TOKEN_REPLY_BYTES, "{sent} bytes sent");
    Ok(())
}

#[test]
fn a_token_that_would_split_the_header_is_refused() -> Result<()> {
    let (err, _, _) = pull_manifest(Play::HeaderSplittingToken)?;
    assert!(err.contains("cannot go into a header"), "{err}");
    Ok(())
}

#[test]
fn a_config_claiming_a_terabyte_is_refused_before_any_read() -> Result<()> {
    let hostile = Hostile::start(Play::HugeConfig)?;
    let registry = hostile.registry();
    let image = format!("{}/evil/app:1", hostile.addr);
    let rt = runtime()?;
    let (manifest, _) = rt.block_on(registry.pull_manifest(&image))?;
    let err = rt
        .block_on(registry.pull_small_blob(&image, manifest.config()))
        .expect_err("a 1 TiB config was read");
    let err = format!("{err:#}");
    assert!(
        err.contains("configs are limited to 4194304 bytes"),
        "{err}"
    );
    assert_eq!(
        hostile.sent.load(Ordering::SeqCst),
        0,
        "the config was requested"
    );
    Ok(())
}
