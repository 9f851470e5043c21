//! The CRI image proxy: a kubelet's image service endpoint (`--image-service-endpoint`)
//! that forwards every call to containerd's CRI plugin unchanged, and keeps the registry
//! credentials a `PullImage` carries (the pod's pull secret). containerd uses them for
//! the manifest but never hands them to a snapshotter; through the proxy, the
//! snapshotter's manifest lookups and the fetcher's range reads of that registry
//! authenticate as the pull did. Credentials stay in memory; nothing of them is logged.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use lazy_erofs_image::registry::{Credentials, Registry, RegistryError};
use lazy_erofs_ondemand::{BlobTable, RegistryCredentials, registry_of};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Where credentials given with a pull go: the daemon's registry client (manifest
/// lookups, whole-layer fetches) and the blob table the fetcher is answered from.
pub struct PullCredentials {
    registry: Arc<Registry>,
    blobs: Option<BlobTable>,
}

impl PullCredentials {
    pub fn new(registry: Arc<Registry>, blobs: Option<BlobTable>) -> Self {
        Self { registry, blobs }
    }

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

/// Forwards to containerd's image service; keeps what `PullImage` authenticates with.
pub struct ImageProxy {
    containerd: ImageServiceClient<Channel>,
    credentials: Arc<PullCredentials>,
}

impl ImageProxy {
    /// A proxy to containerd at `socket` (connected on first use, and again after
    /// containerd restarts).
    pub fn new(socket: PathBuf, credentials: Arc<PullCredentials>) -> Self {
        let channel =
            Endpoint::from_static("http://containerd.sock").connect_with_connector_lazy(
                tower::service_fn(move |_| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }),
            );
        Self {
            containerd: ImageServiceClient::new(channel),
            credentials,
        }
    }

    fn client(&self) -> ImageServiceClient<Channel> {
        self.containerd.clone()
    }
}

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.client().list_images(request.into_inner()).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.client().image_status(request.into_inner()).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let message = request.into_inner();
        let image = message
            .image
            .as_ref()
            .map(|spec| spec.image.clone())
            .unwrap_or_default();
        let span = tracing::info_span!("cri_pull", image = %image);
        if let Some(auth) = &message.auth {
            // Before the pull: containerd prepares the layers (and the snapshotter looks
            // them up) while PullImage runs.
            let _entered = span.enter();
            match credentials_of(&image, auth) {
                Ok(Some(given)) => match self.credentials.provide(&given) {
                    Ok(()) => tracing::info!(
                        registry = %given.registry,
                        username = %given.username,
                        "pull credentials kept for lazy reads"
                    ),
                    Err(err) => tracing::warn!(%err, "pull credentials not kept"),
                },
                Ok(None) => {}
                Err(reason) => tracing::warn!(%reason, "pull credentials not kept"),
            }
        }
        self.client().pull_image(message).await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.client().remove_image(request.into_inner()).await
    }

    async fn image_fs_info(
        &self,
        request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.client().image_fs_info(request.into_inner()).await
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    proxy: ImageProxy,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(ImageServiceServer::new(proxy))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
