//! The lab's recorded state (`/run/sluice-lab/NAME/state.json`): everything `down`, `status`,
//! `exec` and a later `up` need to find what the lab made.

use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::addr::Protocol;
use crate::process::ProcRef;

/// Where labs keep their state.
pub const RUN_ROOT: &str = "/run/sluice-lab";
/// Version of the state file format.
pub const STATE_VERSION: u32 = 1;

/// The files of one lab below [`RUN_ROOT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabPaths {
    pub dir: PathBuf,
}

impl LabPaths {
    pub fn new(name: &str) -> Self {
        LabPaths {
            dir: Path::new(RUN_ROOT).join(name),
        }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The cluster as the API would serve it: what the node agents read.
    pub fn cluster(&self) -> PathBuf {
        self.dir.join("cluster")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// Ready files of the node agents.
    pub fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.logs().join("supervisor.log")
    }
    pub fn ingress_log(&self) -> PathBuf {
        self.logs().join("ingress.log")
    }
    /// The Ingress controller's `--status-file`: the status address of each Ingress.
    pub fn ingress_status(&self) -> PathBuf {
        self.dir.join("ingress-status.json")
    }
    pub fn proxy_log(&self, node: &str) -> PathBuf {
        self.logs().join(format!("proxy.{node}.log"))
    }
    pub fn proxy_ready(&self, node: &str) -> PathBuf {
        self.ready().join(format!("proxy.{node}"))
    }
    /// Status files of the node agents (`--status-file`).
    pub fn status(&self) -> PathBuf {
        self.dir.join("status")
    }
    pub fn proxy_status(&self, node: &str) -> PathBuf {
        self.status().join(format!("proxy.{node}.json"))
    }
    pub fn pod_log(&self, namespace: &str, pod: &str) -> PathBuf {
        self.logs().join(format!("pod.{namespace}.{pod}.log"))
    }
}

/// Where the lab is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// `up` is setting it up.
    Starting,
    /// Every node agent is ready; the lab follows its manifests.
    Ready,
    /// Setting up failed (see `error`); `up` tears it down.
    Failed,
    /// The supervisor is tearing it down.
    Stopping,
}

/// The state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    pub version: u32,
    pub name: String,
    pub manifests_dir: PathBuf,
    pub service_cidr: Ipv4Net,
    /// The IPv6 service CIDR; None in a lab without IPv6 (the host has none, or an older lab).
    /// With it, nodes, pods and the external client have an IPv6 address too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cidr6: Option<Ipv6Net>,
    /// The lab's cgroup (everything the lab runs is below it).
    pub cgroup: PathBuf,
    /// Every netns of the lab starts with this (then `n.` for nodes, `p.` for pods).
    pub netns_prefix: String,
    /// The node agent binary, or None when the lab runs without one.
    pub proxy: Option<PathBuf>,
    pub phase: Phase,
    /// Why setting up failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The log that tells more about `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_log: Option<PathBuf>,
    pub supervisor: Option<ProcRef>,
    /// The bridge joining the nodes and the external client (once made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay: Option<UnderlayState>,
    /// The external client (once made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalState>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// Services as rendered (cluster IPs filled in), for resolving names and for status.
    #[serde(default)]
    pub services: Vec<ServiceState>,
    /// The Ingress controller, while the manifests have Ingresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressState>,
    /// Objects the API server would have refused as the lab renders them (e.g. a clusterIP
    /// outside the service CIDR), one line each naming the object and field; they are left
    /// out of the rendered cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub render_problems: Vec<String>,
}

/// `sluice-ingress`, running with host networking on one node (as a DaemonSet or a hostNetwork
/// Deployment would): HTTP on port 80 and HTTPS on 443 of that node's address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressState {
    pub node: String,
    pub proc: Option<ProcRef>,
    pub log: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub pod_cidr: Ipv4Net,
    pub ip: Ipv4Addr,
    /// The IPv6 pod CIDR (None without IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<Ipv6Net>,
    /// The IPv6 node address, next to `ip` on the uplink (None without IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Index used for default addresses (10.244.INDEX.0/24, node IP).
    pub index: u32,
    /// The node agent, while it runs.
    pub proxy: Option<ProcRef>,
    pub proxy_ready: bool,
    pub proxy_log: Option<PathBuf>,
    /// Counter naming the next host-side veth.
    pub next_veth: u32,
    /// The underlay-side end of the node's uplink (the node side is `eth0` in its netns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_port: Option<String>,
}

/// The underlay: a netns holding one bridge that every node's uplink and the external client's
/// plug into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayState {
    pub netns: String,
    pub bridge: String,
    /// The node network (nodes and the external client have their address in it, unless a
    /// Node names another one).
    pub network: Ipv4Net,
    /// Its IPv6 network (None without IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network6: Option<Ipv6Net>,
}

/// The external client: a netns on the underlay, outside every node, in its own cgroup, with
/// routes to the nodes' addresses only. Probes and `exec` name it `external`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalState {
    pub netns: String,
    /// Its cgroup: below the lab's, outside every node's (no node agent translates for it).
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
    /// Its IPv6 address (None without IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Its interface (in its netns).
    pub ifname: String,
    /// The underlay-side end of its veth.
    pub underlay_port: String,
}

/// A pod's phase as the lab runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodPhase {
    /// Not placed: its node does not exist.
    Pending,
    Running,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub phase: PodPhase,
    pub node: Option<String>,
    pub netns: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address (None without IPv6, or while Pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// The node-side veth.
    pub host_veth: Option<String>,
    pub ports: Vec<PortSpec>,
    /// The test server, while it runs.
    pub server: Option<ProcRef>,
    /// Whether the server is listening on every port.
    pub listening: bool,
    /// Whether the pod is Ready as rendered (the manifest's Ready condition when it gives one).
    pub ready: bool,
    pub log: Option<PathBuf>,
}

impl PodState {
    /// "ns/name".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `pod` ("name" or "ns/name") names this pod.
    pub fn matches(&self, pod: &str) -> bool {
        match pod.split_once('/') {
            Some((ns, name)) => ns == self.namespace && name == self.name,
            None => pod == self.name,
        }
    }
}

/// A Service as rendered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    /// The primary cluster IP (`spec.clusterIP`); None for headless and ExternalName Services.
    pub cluster_ip: Option<IpAddr>,
    /// Every cluster IP (`spec.clusterIPs`: the primary, then the other family's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortState>,
}

impl ServiceState {
    /// Whether `service` ("name" or "ns/name") names this Service.
    pub fn matches(&self, service: &str) -> bool {
        match service.split_once('/') {
            Some((ns, name)) => ns == self.namespace && name == self.name,
            None => service == self.name,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// One declared container port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

impl LabState {
    /// The pod that `pod` ("name" or "ns/name") names; a bare name must be unambiguous.
    pub fn find_pod(&self, pod: &str) -> Result<&PodState> {
        let found: Vec<&PodState> = self.pods.iter().filter(|p| p.matches(pod)).collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => anyhow::bail!("no pod {pod:?} in lab {}", self.name),
            many => anyhow::bail!(
                "pod name {pod:?} is ambiguous in lab {}: {}; use ns/name",
                self.name,
                many.iter().map(|p| p.key()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Reads a state file; None if there is none.
pub fn load(path: &Path) -> Result<Option<LabState>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a state file atomically.
pub fn save(path: &Path, state: &LabState) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state).context("serializing lab state")?;
    write_atomic(path, &bytes)
}

/// Writes a file via a temporary file in the same directory (name starting with '.') and a
/// rename, so readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LabState {
        LabState {
            version: STATE_VERSION,
            name: "t1".into(),
            manifests_dir: "/tmp/m".into(),
            service_cidr: "10.96.0.0/16".parse().unwrap(),
            service_cidr6: Some("fd00:10:96::/112".parse().unwrap()),
            cgroup: "/sys/fs/cgroup/sluice-lab/t1".into(),
            netns_prefix: "sl-t1-".into(),
            proxy: None,
            phase: Phase::Ready,
            error: None,
            error_log: None,
            supervisor: Some(ProcRef {
                pid: 42,
                start_time: 7,
            }),
            underlay: Some(UnderlayState {
                netns: "sl-t1-u".into(),
                bridge: "br0".into(),
                network: "172.18.0.0/16".parse().unwrap(),
                network6: Some(crate::addr::NODE_NETWORK6),
            }),
            external: Some(ExternalState {
                netns: "sl-t1-x".into(),
                cgroup: "/sys/fs/cgroup/sluice-lab/t1/external".into(),
                ip: Ipv4Addr::new(172, 18, 255, 254),
                ip6: Some(crate::addr::EXTERNAL_IP6),
                ifname: "eth0".into(),
                underlay_port: "ext".into(),
            }),
            nodes: vec![NodeState {
                name: "node-1".into(),
                netns: "sl-t1-n.node-1".into(),
                cgroup: "/sys/fs/cgroup/sluice-lab/t1/node.node-1".into(),
                pod_cidr: "10.244.0.0/24".parse().unwrap(),
                ip: Ipv4Addr::new(172, 18, 0, 2),
                pod_cidr6: Some("fd00:10:244::/64".parse().unwrap()),
                ip6: Some("fd00:172:18::2".parse().unwrap()),
                index: 0,
                proxy: None,
                proxy_ready: false,
                proxy_log: None,
                next_veth: 2,
                underlay_port: Some("n0".into()),
            }],
            pods: vec![
                PodState {
                    namespace: "default".into(),
                    name: "web-1".into(),
                    phase: PodPhase::Running,
                    node: Some("node-1".into()),
                    netns: Some("sl-t1-p.default.web-1".into()),
                    cgroup: Some("/x".into()),
                    ip: Some(Ipv4Addr::new(10, 244, 0, 2)),
                    ip6: Some("fd00:10:244::2".parse().unwrap()),
                    host_veth: Some("slv0".into()),
                    ports: vec![PortSpec {
                        name: Some("http".into()),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    }],
                    server: Some(ProcRef {
                        pid: 43,
                        start_time: 8,
                    }),
                    listening: true,
                    ready: true,
                    log: None,
                },
                PodState {
                    namespace: "prod".into(),
                    name: "web-1".into(),
                    phase: PodPhase::Pending,
                    node: None,
                    netns: None,
                    cgroup: None,
                    ip: None,
                    ip6: None,
                    host_veth: None,
                    ports: vec![],
                    server: None,
                    listening: false,
                    ready: false,
                    log: None,
                },
            ],
            services: vec![ServiceState {
                namespace: "default".into(),
                name: "web".into(),
                type_: "ClusterIP".into(),
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10).into()),
                cluster_ips: vec![
                    Ipv4Addr::new(10, 96, 0, 10).into(),
                    "fd00:10:96::a".parse().unwrap(),
                ],
                ports: vec![ServicePortState {
                    name: None,
                    port: 80,
                    protocol: "TCP".into(),
                    node_port: None,
                }],
            }],
            ingress: None,
            render_problems: vec![],
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).unwrap(), None);
        let state = sample();
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state));
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    #[test]
    fn state_of_an_older_lab_without_underlay_still_loads() {
        let mut old = serde_json::to_value(sample()).unwrap();
        let obj = old.as_object_mut().unwrap();
        obj.remove("underlay");
        obj.remove("external");
        obj.remove("service_cidr6");
        obj["nodes"][0]
            .as_object_mut()
            .unwrap()
            .remove("underlay_port");
        for field in ["ip6", "pod_cidr6"] {
            obj["nodes"][0].as_object_mut().unwrap().remove(field);
        }
        obj["pods"][0].as_object_mut().unwrap().remove("ip6");
        obj["services"][0]
            .as_object_mut()
            .unwrap()
            .remove("cluster_ips");
        let st: LabState = serde_json::from_value(old).unwrap();
        assert_eq!((st.underlay, st.external), (None, None));
        assert_eq!(st.nodes[0].underlay_port, None);
        // A lab from before dual-stack: IPv4 only.
        assert_eq!(
            (st.service_cidr6, st.nodes[0].ip6, st.pods[0].ip6),
            (None, None, None)
        );
        assert!(st.services[0].cluster_ips.is_empty());
    }

    #[test]
    fn find_pod_by_name_or_key() {
        let state = sample();
        assert_eq!(
            state.find_pod("default/web-1").unwrap().namespace,
            "default"
        );
        assert_eq!(state.find_pod("prod/web-1").unwrap().namespace, "prod");
        let err = state.find_pod("web-1").unwrap_err().to_string();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(state.find_pod("nope").is_err());
    }

    #[test]
    fn paths() {
        let p = LabPaths::new("demo");
        assert_eq!(p.state(), PathBuf::from("/run/sluice-lab/demo/state.json"));
        assert_eq!(p.cluster(), PathBuf::from("/run/sluice-lab/demo/cluster"));
        assert_eq!(
            p.proxy_log("node-1"),
            PathBuf::from("/run/sluice-lab/demo/logs/proxy.node-1.log")
        );
    }
}
