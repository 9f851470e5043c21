//! The CRI image proxy: a kubelet's image service endpoint (`--image-service-endpoint`)
//! that forwards every call to containerd's CRI plugin unchanged, and keeps the registry
//! credentials a `PullImage` carries (the pod's pull secret). containerd uses them for
//! the manifest but never hands them to a snapshotter; through the proxy, the
//! snapshotter's manifest lookups and the fetcher's range reads of that registry
//! authenticate as the pull did (see [`credentials`]: kept across restarts once a pull
//! with them succeeded). Nothing of them is logged.

mod credentials;

use std::path::PathBuf;
use std::sync::Arc;

pub use credentials::{
    CredentialsError, FILE_NAME as CREDENTIALS_FILE, PullCredentials, credentials_of,
};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use lazy_erofs_ondemand::RegistryCredentials;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::Instrument;

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

    /// Gives the credentials of a pull of `image` for lazy reads; those given.
    fn give(&self, image: &str, auth: Option<&AuthConfig>) -> Option<RegistryCredentials> {
        let given = match credentials_of(image, auth?) {
            Ok(given) => given?,
            Err(reason) => {
                tracing::warn!(%reason, "pull credentials not taken");
                return None;
            }
        };
        match self.credentials.provide(&given) {
            Ok(()) => {
                tracing::info!(
                    registry = %given.registry,
                    username = %given.username,
                    "pull credentials given for lazy reads"
                );
                Some(given)
            }
            Err(err) => {
                tracing::warn!(%err, "pull credentials not taken");
                None
            }
        }
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
        // Before the pull: containerd prepares the layers (and the snapshotter looks them
        // up) while PullImage runs.
        let given = span.in_scope(|| self.give(&image, message.auth.as_ref()));
        let reply = self
            .client()
            .pull_image(message)
            .instrument(span.clone())
            .await?;
        if let Some(given) = given
            && let Err(err) = self.credentials.confirm(&given)
        {
            // The pull stands; only a restart before the next pull loses them.
            span.in_scope(|| tracing::error!(%err, "pull credentials not kept for restarts"));
        }
        Ok(reply)
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
