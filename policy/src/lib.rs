//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`) semantics as a pure library: label
//! selectors, peers, ports and named ports, policy types, and [`explain`]: whether a connection
//! is allowed, and which policies and rules decided it. No I/O; the input is a
//! [`cluster_model::ClusterSnapshot`].
//!
//! It is meant as the oracle the eBPF data path is checked against: a lab sends real traffic
//! between pods and compares what got through with [`PolicySet::explain`].
//!
//! # Semantics
//!
//! - A pod is isolated for ingress (egress) when a policy of its namespace selects it
//!   (`spec.podSelector`; absent or `{}`: every pod of the namespace) and has `Ingress`
//!   (`Egress`) among its `policyTypes`. Absent or empty `policyTypes` mean `Ingress`, plus
//!   `Egress` when `spec.egress` has a rule. Rules of a direction the policy does not list are
//!   ignored.
//! - An isolated pod accepts (sends) only what a rule of a policy selecting it allows; policies
//!   add up. Ingress and egress isolation are independent, and a connection needs both the
//!   source's egress and the destination's ingress.
//! - In a rule, `from`/`to` absent or empty means every peer, `ports` absent or empty every port
//!   of every protocol. Items of a list are OR.
//! - A peer with only `podSelector` is those pods of the policy's namespace; with only
//!   `namespaceSelector`, every pod of the matching namespaces; with both, the pods matching the
//!   pod selector inside the matching namespaces. `{}` matches everything; a selector's
//!   `matchLabels` and `matchExpressions` are ANDed; `NotIn` and `DoesNotExist` match pods
//!   without the key. Namespaces always carry `kubernetes.io/metadata.name`.
//! - A port item's protocol defaults to TCP; without `port` it allows every port of that
//!   protocol; `endPort` makes an inclusive range. A named port is looked up in the
//!   *destination* pod's container ports (regular containers and sidecars, i.e. init containers
//!   with `restartPolicy: Always`) by name and protocol; if several containers have the name,
//!   each of their numbers counts. A destination that is not a pod has no named ports.
//! - Traffic between a pod and the node it runs on is always allowed, in both directions
//!   ([`Exemption::OwnNode`]), and so is a pod's traffic to itself ([`Exemption::SamePod`]).
//! - Replies of an allowed connection are allowed: a verdict is about the first packet.
//!
//! # Decisions where Kubernetes leaves it to the implementation
//!
//! - **`ipBlock` matches pod and node addresses too.** The API reference only says an ipBlock
//!   is a CIDR with exceptions, and the concepts page that ipBlocks "should be cluster-external
//!   IPs, since Pod IPs are ephemeral and unpredictable": a recommendation, with the behaviour
//!   for pod addresses left to implementations. Calico matches pod addresses; Cilium does not
//!   (cilium/cilium#9209, listed by Cilium as a known missing feature); upstream's NetworkPolicy
//!   e2e tests ("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is
//!   allowed" and the CIDR egress tests) put pod IPs in ipBlocks and expect them to match. So
//!   here a CIDR means every address in it, which is also what a reader of the policy expects;
//!   the data path has to check the peer's address against ipBlocks whatever the peer is. A pod
//!   without an address is matched by selectors only.
//! - **Host-network pods are their node.** Policies do not select them, and as peers they are
//!   the node they run on (so only ipBlocks match them, and their own node's pods always talk to
//!   them).
//! - **Nodes and outside addresses** are matched by ipBlocks only; a node talking to a pod on
//!   another node is an ordinary peer.
//! - **Addresses resolve** to the running (not Succeeded/Failed), non-host-network pod that has
//!   them, first in key order if several claim one, else to the node that lists them or runs a
//!   host-network pod that has them, else to the outside.
//! - **Input the API server rejects** (the cluster model drops such policies, but snapshots can
//!   be built by hand) never panics and fails closed item by item: an invalid peer or port
//!   matches nothing, an invalid `podSelector` selects no pod. [`Policy::problems`] lists them.
//! - Connections are explained after Service translation: peers are pods, nodes and
//!   addresses, never ClusterIPs.
//!
//! # Toward the data path
//!
//! Selectors only see a pod's [`Identity`] (namespace, namespace labels, pod labels), so a
//! compile step can number identities ([`Identities`]), compile each rule's pod peers to a set
//! of identity numbers, its ipBlocks to LPM entries, and its ports (named ones per destination
//! pod) to port ranges; [`Policy`], [`Rule`], [`PeerMatch`] and [`PortMatch`] are the parsed
//! form to start from.

pub mod compile;
mod digest;
mod explain;
mod identity;
mod model;
mod selector;

pub use compile::{NodePolicy, compile_node, compiled_verdict};
pub use digest::policy_inputs_digest;
pub use explain::{
    DirectionVerdict, Endpoint, Exemption, ExplainError, Peer, PolicySet, RuleRef, Verdict, explain,
};
pub use identity::{Identities, Identity, IdentityId};
pub use model::{Direction, NamespaceMatch, PeerMatch, Policy, PortMatch, Protocol, Rule};
pub use selector::{Labels, Requirement, Selector, SelectorError};
