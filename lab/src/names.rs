//! Names of everything a lab creates: one place, so that cleanup finds what setup made.
//!
//! Network namespaces are `sl-LAB-n.NODE`, `sl-LAB-p.NAMESPACE.POD`, the underlay `sl-LAB-u` and
//! the external client `sl-LAB-x`. A lab name never contains a '.', so the first '.' ends the
//! `sl-LAB-n`/`sl-LAB-p` part: one lab's names can never start with another lab's prefixes, even
//! when one lab name is a prefix of the other ("a", "a-n"). The underlay and external names have
//! no '.' at all and are whole names: `sl-a-u` is lab "a"'s underlay, `sl-a-u-u` lab "a-u"'s.
//! Kubernetes namespace names are DNS labels (no '.'), so `NAMESPACE.POD` is unambiguous too.

use anyhow::{Result, bail};

/// The lab name used when none is given.
pub const DEFAULT_LAB_NAME: &str = "lab";
/// Longest lab name accepted.
pub const MAX_LAB_NAME: usize = 24;
/// Every netns a lab makes starts with this.
pub const NETNS_PREFIX: &str = "sl-";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Checks a lab name: 1–24 of `a-z 0-9 -`, starting and ending with a letter or digit.
pub fn validate_lab_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > MAX_LAB_NAME || !ok_chars || !ok_ends {
        bail!(
            "invalid lab name {name:?}: use 1-{MAX_LAB_NAME} lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        );
    }
    Ok(())
}

/// The netns of a node.
pub fn node_netns(lab: &str, node: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-n.{node}")
}

/// The netns of a pod.
pub fn pod_netns(lab: &str, namespace: &str, pod: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-p.{namespace}.{pod}")
}

/// The netns of the underlay: the bridge joining the nodes and the external client.
pub fn underlay_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-u")
}

/// The netns of the external client (a machine outside the cluster on the node network).
pub fn external_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-x")
}

/// Whether `netns` is one that lab `lab` makes.
pub fn is_lab_netns(lab: &str, netns: &str) -> bool {
    lab_of_netns(netns) == Some(lab)
}

/// The lab a netns name belongs to, if it is a lab's.
pub fn lab_of_netns(netns: &str) -> Option<&str> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    let Some(dot) = rest.find('.') else {
        // The underlay or the external client: the whole rest is `LAB-u` / `LAB-x`.
        let lab = rest
            .strip_suffix("-u")
            .or_else(|| rest.strip_suffix("-x"))?;
        return validate_lab_name(lab).is_ok().then_some(lab);
    };
    let head = &rest[..dot];
    let lab = head
        .strip_suffix("-n")
        .or_else(|| head.strip_suffix("-p"))?;
    (validate_lab_name(lab).is_ok() && dot + 1 < rest.len()).then_some(lab)
}

/// The node-side veth of a pod: named from a per-node counter, so it fits IFNAMSIZ whatever
/// the pod is called. Interface names only need to be unique inside the node's netns.
pub fn host_veth(counter: u32) -> String {
    format!("slv{counter}")
}

/// The pod-side interface.
pub const POD_IFNAME: &str = "eth0";

/// The bridge in the underlay netns.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// The interface of a node (in its netns) and of the external client that plugs into the
/// underlay; it carries the node's (the client's) address.
pub const UPLINK_IFNAME: &str = "eth0";

/// The underlay-side end of a node's uplink: named from the node's index (`n0`, `n1`, …).
pub fn underlay_port(node_index: u32) -> String {
    format!("n{node_index}")
}

/// The underlay-side end of the external client's uplink.
pub const EXTERNAL_PORT: &str = "ext";

/// How probes, loads and exec name the external client (a pod called `external` is then
/// `NAMESPACE/external`).
pub const EXTERNAL: &str = "external";

/// Directory name of the external client's cgroup below the lab's (outside every node's).
pub const EXTERNAL_CGROUP_DIR: &str = "external";

/// Directory name of a node's cgroup below the lab's.
pub fn node_cgroup_dir(node: &str) -> String {
    format!("node.{node}")
}

/// Directory name of a pod's cgroup below its node's.
pub fn pod_cgroup_dir(namespace: &str, pod: &str) -> String {
    format!("pod.{namespace}.{pod}")
}

/// The cgroup (below a node's) the node agent runs in.
pub const PROXY_CGROUP_DIR: &str = "proxy";
/// The cgroup (below a node's) the Ingress controller runs in.
pub const INGRESS_CGROUP_DIR: &str = "ingress";
/// The cgroup (below the lab's) the supervisor runs in.
pub const SUPERVISOR_CGROUP_DIR: &str = "supervisor";
/// The directory below the cgroup2 root that holds every lab's cgroup.
pub const CGROUP_PARENT: &str = "sluice-lab";

/// File name of a rendered object: `pod_default_web-1.json`, `node_node-1.json`.
/// Kubernetes names never contain '_', so names cannot collide.
pub fn rendered_file(kind: &str, namespace: &str, name: &str) -> String {
    let kind = kind.to_ascii_lowercase();
    if namespace.is_empty() {
        format!("{kind}_{name}.json")
    } else {
        format!("{kind}_{namespace}_{name}.json")
    }
}

/// A pod's file-name-safe id: `default.web-1`.
pub fn pod_id(namespace: &str, pod: &str) -> String {
    format!("{namespace}.{pod}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        for ok in ["lab", "a", "t-1234", "demo2", "a-b-c"] {
            validate_lab_name(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a_b",
            "a/b",
            "abcdefghijklmnopqrstuvwxyz",
        ] {
            assert!(validate_lab_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn netns_names_round_trip() {
        assert_eq!(node_netns("demo", "node-1"), "sl-demo-n.node-1");
        assert_eq!(
            pod_netns("demo", "default", "web-1"),
            "sl-demo-p.default.web-1"
        );
        assert_eq!(lab_of_netns("sl-demo-n.node-1"), Some("demo"));
        assert_eq!(lab_of_netns("sl-demo-p.default.web.x"), Some("demo"));
        assert_eq!(lab_of_netns("sl-a-n-n.x"), Some("a-n"));
        assert_eq!(lab_of_netns("sl-demo-x.y"), None);
        assert_eq!(underlay_netns("demo"), "sl-demo-u");
        assert_eq!(external_netns("demo"), "sl-demo-x");
        assert_eq!(lab_of_netns("sl-demo-u"), Some("demo"));
        assert_eq!(lab_of_netns("sl-demo-x"), Some("demo"));
        assert_eq!(lab_of_netns("sl-a-u-u"), Some("a-u"));
        assert_eq!(lab_of_netns("sl-a-u-x"), Some("a-u"));
        assert_eq!(lab_of_netns("sl-demo"), None);
        assert_eq!(lab_of_netns("sl--u"), None);
        assert_eq!(lab_of_netns("sl-demo-y"), None);
        assert_eq!(lab_of_netns("sl-demo-n."), None);
        assert_eq!(lab_of_netns("other"), None);
    }

    #[test]
    fn prefixes_of_other_labs_never_match() {
        // Lab "a" must not claim the namespaces of labs "a-n", "a-p" or "a-b".
        for (other, ns) in [
            ("a-n", node_netns("a-n", "x")),
            ("a-p", pod_netns("a-p", "default", "x")),
            ("a-b", node_netns("a-b", "n.1")),
            ("a-u", underlay_netns("a-u")),
            ("a-u", external_netns("a-u")),
            ("a-x", underlay_netns("a-x")),
            ("a-x", node_netns("a-x", "u")),
        ] {
            assert!(is_lab_netns(other, &ns));
            assert!(!is_lab_netns("a", &ns), "{ns} claimed by lab a");
        }
    }

    #[test]
    fn veth_names_fit() {
        assert_eq!(host_veth(0), "slv0");
        assert!(host_veth(u32::MAX).len() <= MAX_IFNAME);
        assert_eq!(underlay_port(3), "n3");
        assert!(underlay_port(u32::MAX).len() <= MAX_IFNAME);
    }

    #[test]
    fn rendered_files() {
        assert_eq!(
            rendered_file("Pod", "default", "web-1"),
            "pod_default_web-1.json"
        );
        assert_eq!(rendered_file("Node", "", "node-1"), "node_node-1.json");
        assert_eq!(
            rendered_file("EndpointSlice", "a", "b.c"),
            "endpointslice_a_b.c.json"
        );
    }
}
