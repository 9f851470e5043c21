//! A CRI client speaking the kubelet's API (`runtime.v1`, the `k8s-cri` crate's
//! generated stubs) over containerd's socket: image pulls with the kubelet's
//! credentials, host-network pods, containers run to exit and their CRI logs.

// Shared by several test binaries; each uses a part.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PullImageRequest, RemoveImageRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

/// Registry credentials as a kubelet passes them from an image pull secret.
pub struct Credentials {
    pub username: String,
    pub password: String,
}

pub struct Cri {
    runtime: tokio::runtime::Runtime,
    images: ImageServiceClient<Channel>,
    pods: RuntimeServiceClient<Channel>,
}

/// A running pod sandbox: its id and the config containers are created against.
pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
    pub log_directory: PathBuf,
}

impl Cri {
    /// Connects to the CRI services on containerd's socket at `address`.
    pub fn connect(address: &Path) -> Result<Self> {
        Self::connect_with_image_endpoint(address, address)
    }

    /// The runtime service at `address`, the image service at `images` (as the kubelet's
    /// `--image-service-endpoint` splits them).
    pub fn connect_with_image_endpoint(address: &Path, images: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let connect = |socket: &Path| {
            runtime
                .block_on(containerd_client::connect(socket))
                .with_context(|| format!("connecting to {}", socket.display()))
        };
        let (pods, images) = (connect(address)?, connect(images)?);
        Ok(Self {
            images: ImageServiceClient::new(images),
            pods: RuntimeServiceClient::new(pods),
            runtime,
        })
    }

    /// `PullImage` as the kubelet sends it; the image's reference (its digest form).
    pub fn pull(&mut self, image: &str, auth: Option<&Credentials>) -> Result<String> {
        let request = PullImageRequest {
            image: Some(spec(image)),
            auth: auth.map(|c| AuthConfig {
                username: c.username.clone(),
                password: c.password.clone(),
                ..AuthConfig::default()
            }),
            sandbox_config: None,
        };
        let reply = self
            .runtime
            .block_on(self.images.pull_image(request))
            .with_context(|| format!("CRI PullImage {image}"))?;
        Ok(reply.into_inner().image_ref)
    }

    /// `RemoveImage`, as the kubelet's image GC does.
    pub fn remove_image(&mut self, image: &str) -> Result<()> {
        let request = RemoveImageRequest {
            image: Some(spec(image)),
        };
        self.runtime
            .block_on(self.images.remove_image(request))
            .with_context(|| format!("CRI RemoveImage {image}"))?;
        Ok(())
    }

    /// A pod on the node's network (no CNI), its logs under `log_directory`.
    pub fn run_pod(&mut self, name: &str, log_directory: &Path) -> Result<Pod> {
        std::fs::create_dir_all(log_directory)?;
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: format!("uid-{name}"),
                namespace: "default".to_owned(),
                attempt: 0,
            }),
            // Empty as the kubelet leaves it for host-network pods (no UTS namespace).
            hostname: String::new(),
            log_directory: log_directory.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node.into(),
                        pid: NamespaceMode::Container.into(),
                        ipc: NamespaceMode::Pod.into(),
                        ..NamespaceOption::default()
                    }),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        };
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let reply = self
            .runtime
            .block_on(self.pods.run_pod_sandbox(request))
            .with_context(|| format!("CRI RunPodSandbox {name}"))?;
        Ok(Pod {
            id: reply.into_inner().pod_sandbox_id,
            config,
            log_directory: log_directory.to_path_buf(),
        })
    }

    /// `CreateContainer` + `StartContainer` of `image` running `command` in `pod`; the
    /// container's id. Its log is `<pod log dir>/<name>.log`.
    pub fn start_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(spec(image)),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            log_path: format!("{name}.log"),
            ..ContainerConfig::default()
        };
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let id = self
            .runtime
            .block_on(self.pods.create_container(request))
            .with_context(|| format!("CRI CreateContainer {name} ({image})"))?
            .into_inner()
            .container_id;
        self.runtime
            .block_on(self.pods.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .with_context(|| format!("CRI StartContainer {name}"))?;
        Ok(id)
    }

    /// `ContainerStatus` of `id`.
    pub fn status(&mut self, id: &str) -> Result<ContainerStatus> {
        let request = ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        self.runtime
            .block_on(self.pods.container_status(request))
            .with_context(|| format!("CRI ContainerStatus {id}"))?
            .into_inner()
            .status
            .context("ContainerStatus without a status")
    }

    /// Whether container `id` has exited.
    pub fn exited(&mut self, id: &str) -> Result<bool> {
        Ok(self.status(id)?.state == i32::from(ContainerState::ContainerExited))
    }

    /// Polls `ContainerStatus` until the container exits (or `timeout`); its status.
    pub fn wait_exit(&mut self, id: &str, timeout: Duration) -> Result<ContainerStatus> {
        let started = Instant::now();
        loop {
            let status = self.status(id)?;
            if status.state == i32::from(ContainerState::ContainerExited) {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                bail!("container {id} still running after {timeout:?}: {status:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `StopPodSandbox` + `RemovePodSandbox` (its containers go with it).
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        self.runtime
            .block_on(self.pods.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }))
            .context("CRI StopPodSandbox")?;
        self.runtime
            .block_on(self.pods.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }))
            .context("CRI RemovePodSandbox")?;
        Ok(())
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_owned(),
        annotations: HashMap::new(),
        ..ImageSpec::default()
    }
}

/// The container's output from its CRI log (`<time> <stream> <F|P> <text>` lines),
/// partial lines joined.
pub fn container_output(pod: &Pod, name: &str) -> Result<String> {
    let path = pod.log_directory.join(format!("{name}.log"));
    let log =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = String::new();
    for line in log.lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(_time), Some(_stream), Some(tag), text) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            bail!("not a CRI log line: {line:?}");
        };
        out.push_str(text.unwrap_or_default());
        if tag == "F" {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Polls the container's CRI log until it holds a whole line (or `timeout`); the
/// output so far.
pub fn wait_output(pod: &Pod, name: &str, timeout: Duration) -> Result<String> {
    let started = Instant::now();
    loop {
        if let Ok(out) = container_output(pod, name)
            && out.contains('\n')
        {
            return Ok(out);
        }
        if started.elapsed() > timeout {
            bail!("no output from {name} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The CRI plugin's settings as a node running lazy-erofs has them (README
/// "Kubernetes"), with `snapshotter`, plus what a test needs: no CNI (host-network
/// pods), and a `hosts.toml` under `dir` sending pulls of registry `name` to the
/// registry at `registry_host` over plain HTTP.
pub fn plugin_config(
    dir: &Path,
    name: &str,
    registry_host: &str,
    sandbox_image: &str,
    snapshotter: &str,
) -> Result<String> {
    let hosts = dir.join("certs.d").join(name);
    std::fs::create_dir_all(&hosts)?;
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"http://{name}\"\n\n[host.\"http://{registry_host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;
    Ok(format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        cni = dir.join("cni").display(),
        certs = dir.join("certs.d").display(),
    ))
}
