//! Pull credentials from the kubelet (the image proxy takes them from `PullImage`): given
//! to the snapshotter's registry client and, through the blob table, to the fetcher; and,
//! once a pull with them succeeded, kept in a file under the snapshotter's root (0600,
//! replaced atomically) so a restarted daemon still fetches for the images already on
//! the node. The kubelet never pulls an image containerd has again, so without the file a
//! restart (an upgrade) would leave those layers unreadable. Never logged.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use k8s_cri::v1::AuthConfig;
use lazy_erofs_image::registry::{Credentials, Registry, RegistryError};
use lazy_erofs_ondemand::{BlobTable, RegistryCredentials, registry_of};

/// The file under the snapshotter's root.
pub const FILE_NAME: &str = "pull-credentials.json";
/// Far above any real set of pull secrets; a larger file is not ours.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Unusable { path: String, reason: String },
}

/// Where credentials given with a pull go: the daemon's registry client (manifest
/// lookups, whole-layer fetches), the blob table the fetcher is answered from, and the
/// file kept for restarts.
pub struct PullCredentials {
    registry: Arc<Registry>,
    blobs: Option<BlobTable>,
    file: Option<PathBuf>,
    /// What the file holds, by registry.
    kept: Mutex<BTreeMap<String, RegistryCredentials>>,
}

impl PullCredentials {
    /// Credentials in memory only.
    pub fn new(registry: Arc<Registry>, blobs: Option<BlobTable>) -> Self {
        Self {
            registry,
            blobs,
            file: None,
            kept: Mutex::default(),
        }
    }

    /// Credentials kept in `file`: those it holds are given at once. A file that cannot
    /// be read is logged and replaced by the next successful pull (reads of its
    /// registries fail until then, as before the file existed).
    pub fn with_file(registry: Arc<Registry>, blobs: Option<BlobTable>, file: PathBuf) -> Self {
        let kept = load(&file).unwrap_or_else(|err| {
            tracing::error!(%err, "kept pull credentials unusable; lazy reads of their registries wait for the next pull");
            BTreeMap::new()
        });
        let this = Self {
            file: Some(file),
            kept: Mutex::new(kept.clone()),
            ..Self::new(registry, blobs)
        };
        for given in kept.values() {
            match this.provide(given) {
                Ok(()) => {
                    tracing::info!(registry = %given.registry, username = %given.username, "kept pull credentials given")
                }
                Err(err) => {
                    tracing::warn!(registry = %given.registry, %err, "kept pull credentials not given")
                }
            }
        }
        this
    }

    /// Gives `given` to the registry client and the fetcher, for their registry and its
    /// configured mirrors (before the pull: containerd prepares the layers while it runs).
    pub fn provide(&self, given: &RegistryCredentials) -> Result<(), RegistryError> {
        let credentials = Credentials::Basic {
            username: given.username.clone(),
            password: given.password.clone(),
        };
        self.registry
            .provide_credentials(&given.registry, &credentials)?;
        if let Some(blobs) = &self.blobs {
            blobs.set_credentials(given.clone());
        }
        Ok(())
    }

    /// The pull with `given` succeeded: they are kept for restarts (credentials of a
    /// failed pull never are).
    pub fn confirm(&self, given: &RegistryCredentials) -> Result<(), CredentialsError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.get(&given.registry) == Some(given) {
            return Ok(());
        }
        let mut next = kept.clone();
        next.insert(given.registry.clone(), given.clone());
        save(file, &next)?;
        *kept = next;
        Ok(())
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError + '_ {
    move |source| CredentialsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn load(path: &Path) -> Result<BTreeMap<String, RegistryCredentials>, CredentialsError> {
    let unusable = |reason: String| CredentialsError::Unusable {
        path: path.display().to_string(),
        reason,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io_error(path)(e)),
    };
    let meta = file.metadata().map_err(io_error(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(unusable(format!(
            "mode {:o}: others may have read it; not used",
            meta.permissions().mode() & 0o777
        )));
    }
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(io_error(path))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(unusable(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    // The error says where the JSON broke, never what it held.
    let all: Vec<RegistryCredentials> = serde_json::from_slice(&text).map_err(|e| {
        unusable(format!(
            "not a credentials list (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    Ok(all.into_iter().map(|c| (c.registry.clone(), c)).collect())
}

/// Replaces `path` with `kept`: a 0600 temporary file beside it, synced, renamed over it.
fn save(path: &Path, kept: &BTreeMap<String, RegistryCredentials>) -> Result<(), CredentialsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // tempfile creates its files 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".pull-credentials")
        .tempfile_in(dir)
        .map_err(io_error(path))?;
    let all: Vec<&RegistryCredentials> = kept.values().collect();
    serde_json::to_writer(&mut tmp, &all).map_err(|e| io_error(path)(e.into()))?;
    tmp.as_file().sync_all().map_err(io_error(path))?;
    tmp.persist(path).map_err(|e| io_error(path)(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(path))?;
    Ok(())
}

/// The credentials in a `PullImage`'s auth config, for the registry they are meant for:
/// `server_address`'s host when given (containerd uses them for that host only), else
/// the image's. `Ok(None)` when the pull carries none.
pub fn credentials_of(
    image: &str,
    auth: &AuthConfig,
) -> Result<Option<RegistryCredentials>, String> {
    let (username, password) = if !auth.username.is_empty() || !auth.password.is_empty() {
        (auth.username.clone(), auth.password.clone())
    } else if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| "auth is not base64".to_owned())?;
        let text = String::from_utf8(decoded).map_err(|_| "auth is not UTF-8".to_owned())?;
        let (username, password) = text
            .split_once(':')
            .ok_or_else(|| "auth is not username:password".to_owned())?;
        (username.to_owned(), password.to_owned())
    } else if !auth.identity_token.is_empty() || !auth.registry_token.is_empty() {
        return Err(
            "token credentials (identity_token, registry_token) are not taken for \
                    lazy reads; containerd still pulls with them"
                .into(),
        );
    } else {
        return Ok(None);
    };
    let registry = if auth.server_address.is_empty() {
        registry_of(image).to_owned()
    } else {
        host_of(&auth.server_address)
    };
    Ok(Some(RegistryCredentials {
        registry,
        username,
        password,
    }))
}

/// The host of a server address (`https://index.docker.io/v1/`, `registry.example`),
/// as written in image references.
fn host_of(address: &str) -> String {
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    let host = rest.split('/').next().unwrap_or(rest);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        _ => host.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazy_erofs_image::registry::RegistryOptions;

    fn auth() -> AuthConfig {
        AuthConfig::default()
    }

    #[test]
    fn credentials_come_from_username_and_password_or_the_auth_field() {
        let plain = AuthConfig {
            username: "robot".into(),
            password: "s3cret".into(),
            ..auth()
        };
        let given = credentials_of("registry.example/app:1", &plain)
            .expect("valid")
            .expect("some");
        assert_eq!(
            (
                given.registry.as_str(),
                given.username.as_str(),
                given.password.as_str()
            ),
            ("registry.example", "robot", "s3cret")
        );
        let encoded = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("robot:pa:ss"),
            ..auth()
        };
        let given = credentials_of("python:3", &encoded)
            .expect("valid")
            .expect("some");
        assert_eq!(
            (
                given.registry.as_str(),
                given.username.as_str(),
                given.password.as_str()
            ),
            ("docker.io", "robot", "pa:ss")
        );
        assert_eq!(credentials_of("python:3", &auth()), Ok(None));
    }

    #[test]
    fn the_server_address_names_the_registry() {
        for (address, registry) in [
            ("https://index.docker.io/v1/", "docker.io"),
            ("registry.example:5000", "registry.example:5000"),
            ("http://10.0.0.1:5000/", "10.0.0.1:5000"),
        ] {
            let config = AuthConfig {
                username: "u".into(),
                password: "p".into(),
                server_address: address.into(),
                ..auth()
            };
            let given = credentials_of("other.example/app", &config)
                .expect("valid")
                .expect("some");
            assert_eq!(given.registry, registry, "{address}");
        }
    }

    #[test]
    fn malformed_or_token_auth_is_refused_without_echoing_it() {
        for config in [
            AuthConfig {
                auth: "not base64!".into(),
                ..auth()
            },
            AuthConfig {
                auth: base64::engine::general_purpose::STANDARD.encode("no-colon"),
                ..auth()
            },
            AuthConfig {
                identity_token: "tok3n".into(),
                ..auth()
            },
        ] {
            let err = credentials_of("registry.example/app", &config).expect_err("refused");
            assert!(!err.contains("tok3n") && !err.contains("no-colon"), "{err}");
        }
    }

    fn given(registry: &str, password: &str) -> RegistryCredentials {
        RegistryCredentials {
            registry: registry.into(),
            username: "robot".into(),
            password: password.into(),
        }
    }

    fn credentials(file: &Path) -> (PullCredentials, BlobTable) {
        let blobs = BlobTable::default();
        let registry = Arc::new(Registry::new(&RegistryOptions::default()));
        let credentials =
            PullCredentials::with_file(registry, Some(blobs.clone()), file.to_path_buf());
        (credentials, blobs)
    }

    #[test]
    fn a_successful_pulls_credentials_are_kept_0600_and_given_again_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(FILE_NAME);
        let (first, _) = credentials(&file);
        let (ok, failed) = (
            given("r.example", "s3cret"),
            given("other.example", "wr0ng"),
        );
        for pulled in [&ok, &failed] {
            first.provide(pulled).expect("provide");
        }
        // Only the pull that succeeded is confirmed.
        first.confirm(&ok).expect("confirm");
        let mode = std::fs::metadata(&file).expect("kept").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let (_restarted, blobs) = credentials(&file);
        assert_eq!(blobs.registry_credentials("r.example"), Some(ok));
        assert_eq!(blobs.registry_credentials("other.example"), None);
    }

    #[test]
    fn an_unusable_file_is_not_fatal_and_the_next_pull_replaces_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(FILE_NAME);
        let write = |bytes: &[u8], mode: u32| {
            std::fs::write(&file, bytes).expect("write");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        let good = serde_json::to_vec(&[given("r.example", "s3cret")]).expect("json");
        for (bytes, mode) in [
            (b"{not json".to_vec(), 0o600),
            (vec![b' '; (MAX_FILE_BYTES + 1) as usize], 0o600),
            (good.clone(), 0o644),
        ] {
            write(&bytes, mode);
            let err = load(&file).expect_err("unusable");
            assert!(!err.to_string().contains("s3cret"), "{err}");
            let (credentials, blobs) = credentials(&file);
            assert_eq!(blobs.registry_credentials("r.example"), None);
            credentials
                .confirm(&given("r.example", "n3w"))
                .expect("confirm");
            assert_eq!(load(&file).expect("replaced")["r.example"].password, "n3w");
        }
        write(&good, 0o600);
        assert_eq!(load(&file).expect("good")["r.example"].password, "s3cret");
    }
}
