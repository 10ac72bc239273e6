//! One test per rule of the NetworkPolicy API reference (networking.k8s.io/v1, Kubernetes
//! 1.35), plus the rules of shared/SEMANTICS.md and this crate's documented decisions. Each test
//! quotes the rule it checks; each is a table of connections in the cluster of `common`.

mod common;

use common::*;
use sluice_policy::{
    Direction, DirectionVerdict, Exemption, ExplainError, PolicySet, RuleRef, explain,
};

const DENY_ALL_INGRESS: &str = "podSelector: {}\npolicyTypes: [Ingress]";

/// NetworkPolicySpec.podSelector: "selects the pods to which this NetworkPolicy object applies
/// ... An empty selector matches all pods in the policy's namespace ... If it is not specified,
/// it defaults to an empty selector."
#[test]
fn spec_pod_selector_selects_pods_of_the_policy_namespace() {
    check(
        "podSelector {} selects every pod of the namespace, and only of it",
        &[np("default", "deny", DENY_ALL_INGRESS)],
        &[
            case(
                "default/web isolated",
                pod("prod/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "default/db isolated",
                pod("prod/client"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "prod/api not selected",
                pod("default/client"),
                pod("prod/api"),
                8081,
                TCP,
                true,
            ),
        ],
    );
    check(
        "podSelector absent is {}",
        &[np("default", "deny", "policyTypes: [Ingress]")],
        &[
            case(
                "default/web isolated",
                pod("prod/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "prod/api not selected",
                pod("dev/client"),
                pod("prod/api"),
                8081,
                TCP,
                true,
            ),
        ],
    );
    check(
        "a label selector selects matching pods only",
        &[np(
            "default",
            "deny-web",
            "podSelector: {matchLabels: {app: web}}",
        )],
        &[
            case(
                "web isolated",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "db not selected",
                pod("default/client"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
        ],
    );
    check(
        "matchExpressions in the policy's pod selector",
        &[np(
            "default",
            "deny-not-back",
            "podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [back]}]}",
        )],
        &[
            case(
                "web (tier=front) isolated",
                pod("prod/client"),
                pod("default/web"),
                80,
                TCP,
                false,
            ),
            case(
                "client (no tier) isolated",
                pod("prod/client"),
                pod("default/client"),
                80,
                TCP,
                false,
            ),
            case(
                "db (tier=back) not selected",
                pod("prod/client"),
                pod("default/db"),
                80,
                TCP,
                true,
            ),
        ],
    );
}

/// NetworkPolicySpec.podSelector: "Multiple network policies can select the same set of pods.
/// In this case, the ingress rules for each are combined additively."
#[test]
fn spec_policies_add_up() {
    check(
        "two policies selecting web: either's rules allow",
        &[
            np(
                "default",
                "from-client",
                "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]",
            ),
            np(
                "default",
                "from-prod",
                "podSelector: {matchLabels: {tier: front}}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}}]}]",
            ),
            np("default", "deny", DENY_ALL_INGRESS),
        ],
        &[
            case(
                "first policy allows",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "second policy allows",
                pod("prod/api"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "neither allows",
                pod("dev/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "deny-all adds nothing for db",
                pod("default/client"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicySpec.policyTypes: "If this field is not specified, it will default based on
/// the existence of ingress or egress rules; policies that contain an egress section are
/// assumed to affect egress, and all policies (whether or not they contain an ingress section)
/// are assumed to affect ingress. If you want to write an egress-only policy, you must
/// explicitly specify policyTypes [ "Egress" ]. Likewise, if you want to write a policy that
/// specifies that no egress is allowed, you must specify a policyTypes value that include
/// "Egress"".
#[test]
fn spec_policy_types_explicit_and_inferred() {
    let to_db = "podSelector: {matchLabels: {app: web}}\negress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]";
    check(
        "absent with egress rules: Ingress and Egress",
        &[np("default", "web-to-db", to_db)],
        &[
            case(
                "egress to db allowed",
                pod("default/web"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
            case(
                "egress elsewhere denied",
                pod("default/web"),
                pod("prod/api"),
                8081,
                TCP,
                false,
            ),
            case(
                "ingress to web now isolated too",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "explicit [Egress]: egress only",
        &[np(
            "default",
            "web-to-db",
            &format!("{to_db}\npolicyTypes: [Egress]"),
        )],
        &[
            case(
                "egress elsewhere denied",
                pod("default/web"),
                pod("prod/api"),
                8081,
                TCP,
                false,
            ),
            case(
                "ingress to web not isolated",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
        ],
    );
    check(
        "absent without egress: Ingress only, so egress stays open",
        &[np(
            "default",
            "web-in",
            "podSelector: {matchLabels: {app: web}}\ningress: [{}]",
        )],
        &[case(
            "web's egress not isolated",
            pod("default/web"),
            ip("203.0.113.7"),
            443,
            TCP,
            true,
        )],
    );
    check(
        "explicit [Ingress, Egress] without egress rules: no egress at all",
        &[np(
            "default",
            "web-no-egress",
            "podSelector: {matchLabels: {app: web}}\ningress: [{}]\npolicyTypes: [Ingress, Egress]",
        )],
        &[
            case(
                "egress denied",
                pod("default/web"),
                ip("203.0.113.7"),
                443,
                TCP,
                false,
            ),
            case(
                "ingress allowed by the rule",
                pod("dev/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
        ],
    );
    check(
        "explicit [Egress] ignores ingress rules and does not isolate ingress",
        &[np(
            "default",
            "web-egress-only",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{podSelector: {matchLabels: {app: nobody}}}]}]\npolicyTypes: [Egress]",
        )],
        &[case(
            "ingress not isolated",
            pod("default/client"),
            pod("default/web"),
            8080,
            TCP,
            true,
        )],
    );
}

/// NetworkPolicySpec.ingress: "Traffic is allowed to a pod if there are no NetworkPolicies
/// selecting the pod (and cluster policy otherwise allows the traffic), OR if the traffic source
/// is the pod's local node, OR if the traffic matches at least one ingress rule across all of
/// the NetworkPolicy objects whose podSelector matches the pod. If this field is empty then this
/// NetworkPolicy does not allow any traffic (and serves solely to ensure that the pods it
/// selects are isolated by default)".
#[test]
fn spec_ingress_isolation_and_rules() {
    check(
        "no policy: everything allowed",
        &[],
        &[
            case(
                "pod to pod",
                pod("dev/client"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
            case(
                "outside to pod",
                ip("203.0.113.7"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
        ],
    );
    check(
        "empty ingress isolates; local node still allowed",
        &[np(
            "default",
            "deny",
            "podSelector: {matchLabels: {app: web}}\ningress: []",
        )],
        &[
            case(
                "pod denied",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "outside denied",
                ip("203.0.113.7"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "web's node (by name) allowed",
                node("node-a"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "web's node (by address) allowed",
                ip("192.168.0.1"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "another node denied",
                node("node-b"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "a host-network pod on web's node is that node",
                pod("default/agent"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
        ],
    );
}

/// NetworkPolicySpec.egress: "Outgoing traffic is allowed if there are no NetworkPolicies
/// selecting the pod (and cluster policy otherwise allows the traffic), OR if the traffic
/// matches at least one egress rule across all of the NetworkPolicy objects whose podSelector
/// matches the pod. If this field is empty then this NetworkPolicy limits all outgoing traffic".
/// The own-node exemption (SEMANTICS.md) holds for egress too.
#[test]
fn spec_egress_isolation_and_rules() {
    check(
        "empty egress with policyTypes [Egress] isolates",
        &[np(
            "default",
            "no-egress",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]",
        )],
        &[
            case(
                "to a pod denied",
                pod("default/web"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "to outside denied",
                pod("default/web"),
                ip("203.0.113.7"),
                443,
                TCP,
                false,
            ),
            case(
                "to its own node allowed",
                pod("default/web"),
                node("node-a"),
                10250,
                TCP,
                true,
            ),
            case(
                "to another node denied",
                pod("default/web"),
                ip("192.168.0.2"),
                10250,
                TCP,
                false,
            ),
            case(
                "others not isolated",
                pod("default/db"),
                ip("203.0.113.7"),
                443,
                TCP,
                true,
            ),
        ],
    );
    check(
        "egress rules across policies add up",
        &[
            np(
                "default",
                "to-db",
                "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]",
            ),
            np(
                "default",
                "to-dns",
                "podSelector: {}\npolicyTypes: [Egress]\negress: [{ports: [{port: 53, protocol: UDP}]}]",
            ),
        ],
        &[
            case(
                "to db by the first",
                pod("default/web"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
            case(
                "dns anywhere by the second",
                pod("default/web"),
                ip("203.0.113.7"),
                53,
                UDP,
                true,
            ),
            case(
                "neither",
                pod("default/web"),
                ip("203.0.113.7"),
                443,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicyIngressRule.from: "Items in this list are combined using a logical OR
/// operation. If this field is empty or missing, this rule matches all sources (traffic not
/// restricted by source). If this field is present and contains at least one item, this rule
/// allows traffic only if the traffic matches at least one item in the from list."
#[test]
fn ingress_rule_from() {
    let web = "podSelector: {matchLabels: {app: web}}\n";
    for (name, spec) in [
        (
            "from missing",
            format!("{web}ingress: [{{ports: [{{port: 8080}}]}}]"),
        ),
        (
            "from empty",
            format!("{web}ingress: [{{from: [], ports: [{{port: 8080}}]}}]"),
        ),
    ] {
        check(
            name,
            &[np("default", "p", &spec)],
            &[
                case(
                    "any pod",
                    pod("dev/client"),
                    pod("default/web"),
                    8080,
                    TCP,
                    true,
                ),
                case(
                    "outside",
                    ip("203.0.113.7"),
                    pod("default/web"),
                    8080,
                    TCP,
                    true,
                ),
                case(
                    "other port",
                    pod("dev/client"),
                    pod("default/web"),
                    9090,
                    TCP,
                    false,
                ),
            ],
        );
    }
    check(
        "items are OR",
        &[np(
            "default",
            "p",
            &format!(
                "{web}ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}, {{ipBlock: {{cidr: 203.0.113.0/24}}}}]}}]"
            ),
        )],
        &[
            case(
                "first item",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "second item",
                ip("203.0.113.7"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "no item",
                pod("default/db"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicyEgressRule.to: "Items in this list are combined using a logical OR operation.
/// If this field is empty or missing, this rule matches all destinations (traffic not
/// restricted by destination). If this field is present and contains at least one item, this
/// rule allows traffic only if the traffic matches at least one item in the to list."
#[test]
fn egress_rule_to() {
    let web = "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\n";
    for (name, spec) in [
        (
            "to missing",
            format!("{web}egress: [{{ports: [{{port: 443}}]}}]"),
        ),
        (
            "to empty",
            format!("{web}egress: [{{to: [], ports: [{{port: 443}}]}}]"),
        ),
    ] {
        check(
            name,
            &[np("default", "p", &spec)],
            &[
                case(
                    "outside",
                    pod("default/web"),
                    ip("203.0.113.7"),
                    443,
                    TCP,
                    true,
                ),
                case("a pod", pod("default/web"), pod("prod/api"), 443, TCP, true),
                case(
                    "other port",
                    pod("default/web"),
                    ip("203.0.113.7"),
                    80,
                    TCP,
                    false,
                ),
            ],
        );
    }
    check(
        "items are OR",
        &[np(
            "default",
            "p",
            &format!(
                "{web}egress: [{{to: [{{podSelector: {{matchLabels: {{app: db}}}}}}, {{namespaceSelector: {{matchLabels: {{team: a}}}}}}]}}]"
            ),
        )],
        &[
            case(
                "first item",
                pod("default/web"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
            case(
                "second item",
                pod("default/web"),
                pod("prod/api"),
                8081,
                TCP,
                true,
            ),
            case(
                "no item",
                pod("default/web"),
                pod("dev/client"),
                80,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicyIngressRule.ports / NetworkPolicyEgressRule.ports: "Each item in this list is
/// combined using a logical OR. If this field is empty or missing, this rule matches all ports
/// (traffic not restricted by port). If this field is present and contains at least one item,
/// then this rule allows traffic only if the traffic matches at least one port in the list."
#[test]
fn rule_ports() {
    let from_client = "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{podSelector: {matchLabels: {app: client}}}]\n";
    for (name, ports) in [("ports missing", ""), ("ports empty", "  ports: []\n")] {
        check(
            name,
            &[np("default", "p", &format!("{from_client}{ports}"))],
            &[
                case(
                    "any TCP port",
                    pod("default/client"),
                    pod("default/web"),
                    1,
                    TCP,
                    true,
                ),
                case(
                    "any UDP port",
                    pod("default/client"),
                    pod("default/web"),
                    65535,
                    UDP,
                    true,
                ),
                case(
                    "SCTP too",
                    pod("default/client"),
                    pod("default/web"),
                    9,
                    SCTP,
                    true,
                ),
                case(
                    "peer still restricted",
                    pod("default/db"),
                    pod("default/web"),
                    1,
                    TCP,
                    false,
                ),
            ],
        );
    }
    check(
        "items are OR",
        &[np(
            "default",
            "p",
            &format!("{from_client}  ports: [{{port: 8080}}, {{port: 53, protocol: UDP}}]\n"),
        )],
        &[
            case(
                "first",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "second",
                pod("default/client"),
                pod("default/web"),
                53,
                UDP,
                true,
            ),
            case(
                "neither",
                pod("default/client"),
                pod("default/web"),
                53,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicyPort.port: "This can either be a numerical or named port on a pod. If this
/// field is not provided, this matches all port names and numbers. If present, only traffic on
/// the specified protocol AND port will be matched." Named ports are looked up in the
/// destination pod's container ports by name and protocol (SEMANTICS.md).
#[test]
fn port_number_and_name() {
    let ingress_web = |ports: &str| {
        np(
            "default",
            "p",
            &format!("podSelector: {{matchLabels: {{app: web}}}}\ningress: [{{ports: [{ports}]}}]"),
        )
    };
    check(
        "numeric port",
        &[ingress_web("{port: 8080}")],
        &[
            case(
                "that port",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "another port",
                pod("default/client"),
                pod("default/web"),
                8081,
                TCP,
                false,
            ),
            case(
                "that port, other protocol",
                pod("default/client"),
                pod("default/web"),
                8080,
                UDP,
                false,
            ),
        ],
    );
    check(
        "no port: every port of the protocol",
        &[ingress_web("{protocol: UDP}")],
        &[
            case(
                "any UDP port",
                pod("default/client"),
                pod("default/web"),
                5353,
                UDP,
                true,
            ),
            case(
                "TCP not",
                pod("default/client"),
                pod("default/web"),
                5353,
                TCP,
                false,
            ),
        ],
    );
    check(
        "named port, ingress: the selected pod's container port",
        &[ingress_web(
            "{port: http}, {port: metrics}, {port: dns, protocol: UDP}",
        )],
        &[
            case(
                "http is 8080 on web",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "metrics is 9090 on web (other container)",
                pod("default/client"),
                pod("default/web"),
                9090,
                TCP,
                true,
            ),
            case(
                "dns is 53/UDP on web",
                pod("default/client"),
                pod("default/web"),
                53,
                UDP,
                true,
            ),
            case(
                "a port with no such name",
                pod("default/client"),
                pod("default/web"),
                8081,
                TCP,
                false,
            ),
        ],
    );
    check(
        "named port needs name AND protocol",
        &[ingress_web("{port: dns}")],
        &[case(
            "dns is UDP, the item TCP",
            pod("default/client"),
            pod("default/web"),
            53,
            TCP,
            false,
        )],
    );
    check(
        "named port, egress: resolved against the destination pod",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{ports: [{port: http}, {port: admin}, {port: setup}]}]",
        )],
        &[
            case(
                "http is 8081 on prod/api",
                pod("default/web"),
                pod("prod/api"),
                8081,
                TCP,
                true,
            ),
            case(
                "8080 is web's http, not api's",
                pod("default/web"),
                pod("prod/api"),
                8080,
                TCP,
                false,
            ),
            case(
                "sidecar ports count",
                pod("default/web"),
                pod("prod/api"),
                9901,
                TCP,
                true,
            ),
            case(
                "plain init container ports do not",
                pod("default/web"),
                pod("prod/api"),
                7000,
                TCP,
                false,
            ),
            case(
                "db has no port named http",
                pod("default/web"),
                pod("default/db"),
                8081,
                TCP,
                false,
            ),
            case(
                "outside addresses have no named ports",
                pod("default/web"),
                ip("203.0.113.7"),
                8081,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicyPort.endPort: "indicates that the range of ports from port to endPort if set,
/// inclusive, should be allowed by the policy."
#[test]
fn port_end_port_range_inclusive() {
    check(
        "port 30000 endPort 30010",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{ports: [{port: 30000, endPort: 30010}]}]",
        )],
        &[
            case(
                "below",
                pod("default/client"),
                pod("default/web"),
                29999,
                TCP,
                false,
            ),
            case(
                "start",
                pod("default/client"),
                pod("default/web"),
                30000,
                TCP,
                true,
            ),
            case(
                "inside",
                pod("default/client"),
                pod("default/web"),
                30005,
                TCP,
                true,
            ),
            case(
                "end, inclusive",
                pod("default/client"),
                pod("default/web"),
                30010,
                TCP,
                true,
            ),
            case(
                "above",
                pod("default/client"),
                pod("default/web"),
                30011,
                TCP,
                false,
            ),
            case(
                "in range, UDP",
                pod("default/client"),
                pod("default/web"),
                30005,
                UDP,
                false,
            ),
        ],
    );
    check(
        "endPort equal to port",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{ports: [{port: 443, endPort: 443}]}]",
        )],
        &[
            case(
                "the port",
                pod("default/client"),
                pod("default/web"),
                443,
                TCP,
                true,
            ),
            case(
                "next",
                pod("default/client"),
                pod("default/web"),
                444,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicyPort.protocol: "represents the protocol (TCP, UDP, or SCTP) which traffic must
/// match. If not specified, this field defaults to TCP."
#[test]
fn port_protocol_defaults_to_tcp() {
    check(
        "protocols",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{ports: [{port: 80}, {port: 81, protocol: UDP}, {port: 82, protocol: SCTP}]}]",
        )],
        &[
            case(
                "80 defaulted to TCP",
                pod("default/client"),
                pod("default/web"),
                80,
                TCP,
                true,
            ),
            case(
                "80/UDP not",
                pod("default/client"),
                pod("default/web"),
                80,
                UDP,
                false,
            ),
            case(
                "81/UDP",
                pod("default/client"),
                pod("default/web"),
                81,
                UDP,
                true,
            ),
            case(
                "81/TCP not",
                pod("default/client"),
                pod("default/web"),
                81,
                TCP,
                false,
            ),
            case(
                "82/SCTP",
                pod("default/client"),
                pod("default/web"),
                82,
                SCTP,
                true,
            ),
        ],
    );
}

/// NetworkPolicyPeer.podSelector: "This field follows standard label selector semantics; if
/// present but empty, it selects all pods. If namespaceSelector is also set, then the
/// NetworkPolicyPeer as a whole selects the pods matching podSelector in the Namespaces selected
/// by NamespaceSelector. Otherwise it selects the pods matching podSelector in the policy's own
/// namespace."
#[test]
fn peer_pod_selector() {
    check(
        "podSelector only: the policy's namespace",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]",
        )],
        &[
            case(
                "client in default",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "client in prod: other namespace",
                pod("prod/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "not a client",
                pod("default/db"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "outside address",
                ip("203.0.113.7"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "podSelector {}: every pod of the policy's namespace",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{podSelector: {}}]}]",
        )],
        &[
            case(
                "same namespace",
                pod("default/db"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "other namespace",
                pod("prod/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "podSelector with matchExpressions",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [client, db]}, {key: tier, operator: DoesNotExist}]}}]}]",
        )],
        &[
            case(
                "client: in, no tier",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "db has a tier",
                pod("default/db"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicyPeer.namespaceSelector: "selects namespaces using cluster-scoped labels. This
/// field follows standard label selector semantics; if present but empty, it selects all
/// namespaces. If podSelector is also set, then the NetworkPolicyPeer as a whole selects the
/// pods matching podSelector in the namespaces selected by namespaceSelector. Otherwise it
/// selects all pods in the namespaces selected by namespaceSelector."
#[test]
fn peer_namespace_selector() {
    check(
        "namespaceSelector only: every pod of matching namespaces",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]",
        )],
        &[
            case(
                "prod/api",
                pod("prod/api"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "prod/client",
                pod("prod/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "dev (team b)",
                pod("dev/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "own namespace not implied",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "namespaceSelector {}: every namespace",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{namespaceSelector: {}}]}]",
        )],
        &[
            case(
                "dev",
                pod("dev/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "default",
                pod("default/db"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "not outside addresses",
                ip("203.0.113.7"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "not other nodes",
                node("node-b"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "both in one item: AND",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: a}}\n    podSelector: {matchLabels: {app: client}}",
        )],
        &[
            case(
                "client in prod",
                pod("prod/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "api in prod: not a client",
                pod("prod/api"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "client in dev: not team a",
                pod("dev/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "client in default",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "two items: OR",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: a}}\n  - podSelector: {matchLabels: {app: client}}",
        )],
        &[
            case(
                "api in prod",
                pod("prod/api"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "client in default",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "client in dev",
                pod("dev/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "every namespace carries kubernetes.io/metadata.name",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}}]}]",
        )],
        &[
            case(
                "dev (explicit namespace)",
                pod("dev/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "prod",
                pod("prod/client"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "implied namespaces carry it too",
        &[np(
            "prod",
            "p",
            "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}}]}]",
        )],
        &[
            case(
                "default (implied)",
                pod("default/client"),
                pod("prod/api"),
                8081,
                TCP,
                true,
            ),
            case("dev", pod("dev/client"), pod("prod/api"), 8081, TCP, false),
        ],
    );
}

/// NetworkPolicyPeer.ipBlock, IPBlock.cidr and IPBlock.except: "except is a slice of CIDRs that
/// should not be included within an IPBlock". IPv4 and IPv6.
#[test]
fn peer_ip_block_with_except() {
    check(
        "cidr with except",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress: [{from: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25, 203.0.113.7/32]}}, {ipBlock: {cidr: \"2001:db8::/32\", except: [\"2001:db8:bad::/48\"]}}]}]",
        )],
        &[
            case(
                "inside",
                ip("203.0.113.1"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "in an except /32",
                ip("203.0.113.7"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "in an except /25",
                ip("203.0.113.200"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "outside the cidr",
                ip("198.51.100.1"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "IPv6 inside",
                ip("2001:db8::1"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "IPv6 in except",
                ip("2001:db8:bad::1"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
        ],
    );
    check(
        "egress to a cidr",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]}]",
        )],
        &[
            case(
                "the internet",
                pod("default/web"),
                ip("203.0.113.7"),
                443,
                TCP,
                true,
            ),
            case(
                "excepted pod network",
                pod("default/web"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "nodes are addresses too",
                pod("default/web"),
                node("node-b"),
                10250,
                TCP,
                true,
            ),
        ],
    );
}

/// Decision (crate docs): ipBlock matches pod addresses too, as upstream's e2e tests expect.
#[test]
fn decision_ip_block_matches_pod_addresses() {
    check(
        "a pod's address inside an ipBlock",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{ipBlock: {cidr: 10.0.1.0/24, except: [10.0.1.3/32]}}]}]",
        )],
        &[
            case(
                "web 10.0.1.1",
                pod("default/web"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
            case(
                "prod/client 10.0.1.3 is excepted",
                pod("prod/client"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "dev/client 10.0.2.3 outside",
                pod("dev/client"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "named by address",
                ip("10.0.1.2"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
        ],
    );
    check(
        "a dual-stack pod is matched by the address the connection uses",
        &[np(
            "default",
            "p",
            "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{ipBlock: {cidr: \"fd00::/64\"}}]}]",
        )],
        &[
            case(
                "by key: its primary (IPv4) address",
                pod("prod/api"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "by its IPv6 address",
                ip("fd00::2:2"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
        ],
    );
}

/// SEMANTICS.md: "a connection needs both the source's egress and the destination's ingress to
/// allow it"; ingress and egress isolation are independent.
#[test]
fn connection_needs_egress_and_ingress() {
    let egress = np(
        "default",
        "web-egress",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]",
    );
    let ingress = np(
        "default",
        "db-ingress",
        "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]",
    );
    check(
        "egress allows, ingress denies",
        &[egress.clone(), ingress.clone()],
        &[
            case(
                "web to db: db's ingress denies",
                pod("default/web"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "client to db: client not egress-isolated",
                pod("default/client"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
            case(
                "web is not ingress-isolated",
                pod("default/client"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "db is not egress-isolated",
                pod("default/db"),
                ip("203.0.113.7"),
                443,
                TCP,
                true,
            ),
        ],
    );
    let ingress_web = np(
        "default",
        "db-from-web",
        "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]",
    );
    check(
        "both allow",
        &[egress, ingress, ingress_web],
        &[case(
            "web to db",
            pod("default/web"),
            pod("default/db"),
            5432,
            TCP,
            true,
        )],
    );
}

/// SEMANTICS.md: "A pod's traffic to its own address stays inside its namespace (loopback): it
/// never crosses the pod's interface and is always allowed."
#[test]
fn pod_to_itself_always_allowed() {
    check(
        "deny everything, both directions",
        &[np(
            "default",
            "deny",
            "podSelector: {}\npolicyTypes: [Ingress, Egress]",
        )],
        &[
            case(
                "by key",
                pod("default/web"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "to its own address",
                pod("default/web"),
                ip("10.0.1.1"),
                8080,
                TCP,
                true,
            ),
            case(
                "to another pod",
                pod("default/web"),
                pod("default/client"),
                8080,
                TCP,
                false,
            ),
        ],
    );
}

/// NetworkPolicySpec.ingress: "OR if the traffic source is the pod's local node"; SEMANTICS.md:
/// "Traffic between a pod and the node it runs on is always allowed, so probes work."
#[test]
fn pod_and_its_node_always_allowed() {
    check(
        "deny everything, both directions",
        &[np(
            "default",
            "deny",
            "podSelector: {}\npolicyTypes: [Ingress, Egress]",
        )],
        &[
            case(
                "node-a to web (on node-a)",
                node("node-a"),
                pod("default/web"),
                8080,
                TCP,
                true,
            ),
            case(
                "web to node-a",
                pod("default/web"),
                node("node-a"),
                10250,
                TCP,
                true,
            ),
            case(
                "web to node-a's address",
                pod("default/web"),
                ip("192.168.0.1"),
                10250,
                TCP,
                true,
            ),
            case(
                "node-b to web",
                node("node-b"),
                pod("default/web"),
                8080,
                TCP,
                false,
            ),
            case(
                "web to node-b",
                pod("default/web"),
                node("node-b"),
                10250,
                TCP,
                false,
            ),
            case(
                "node-b to db (on node-b)",
                node("node-b"),
                pod("default/db"),
                5432,
                TCP,
                true,
            ),
        ],
    );
}

/// Decision (crate docs): host-network pods are their node: no policy selects them, and as
/// peers only ipBlocks match them.
#[test]
fn decision_host_network_pods_are_their_node() {
    check(
        "a policy selecting app=agent does not isolate the host-network pod",
        &[np(
            "default",
            "agent",
            "podSelector: {matchLabels: {app: agent}}\npolicyTypes: [Ingress, Egress]",
        )],
        &[
            case(
                "to the agent",
                pod("default/db"),
                pod("default/agent"),
                9100,
                TCP,
                true,
            ),
            case(
                "from the agent",
                pod("default/agent"),
                ip("203.0.113.7"),
                443,
                TCP,
                true,
            ),
        ],
    );
    check(
        "pod selectors do not match it as a peer; an ipBlock does",
        &[np(
            "default",
            "db",
            "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{podSelector: {matchLabels: {app: agent}}}]\n  ports: [{port: 5432}]\n- from: [{ipBlock: {cidr: 192.168.0.0/24}}]\n  ports: [{port: 9187}]",
        )],
        &[
            case(
                "by label: no",
                pod("default/agent"),
                pod("default/db"),
                5432,
                TCP,
                false,
            ),
            case(
                "by address: yes",
                pod("default/agent"),
                pod("default/db"),
                9187,
                TCP,
                true,
            ),
        ],
    );
}

/// The verdict names the isolating policies and every rule that allowed the connection, with
/// its index in `spec.ingress` / `spec.egress`.
#[test]
fn verdict_names_policies_and_rules() {
    let snap = snapshot(&[
        np(
            "default",
            "a",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{podSelector: {matchLabels: {app: db}}}]\n- ports: [{port: 8080}]\n- from: [{namespaceSelector: {}}]",
        ),
        np("default", "b", "podSelector: {}\ningress: []"),
        np(
            "default",
            "c",
            "podSelector: {matchLabels: {tier: front}}\npolicyTypes: [Egress]",
        ),
    ]);
    let set = PolicySet::new(&snap);
    let v = set
        .explain(&pod("default/client"), &pod("default/web"), 8080, TCP)
        .expect("explain");
    assert!(v.allowed, "{v}");
    assert_eq!(v.egress, DirectionVerdict::NotIsolated);
    let rule = |name: &str, rule| RuleRef {
        policy: cluster_model::ObjectKey::new("default", name),
        direction: Direction::Ingress,
        rule,
    };
    assert_eq!(
        v.ingress,
        DirectionVerdict::Isolated {
            isolated_by: vec![
                cluster_model::ObjectKey::new("default", "a"),
                cluster_model::ObjectKey::new("default", "b"),
            ],
            allowed_by: vec![rule("a", 1), rule("a", 2)],
        }
    );
    assert_eq!(
        v.to_string(),
        "pod default/client (10.0.1.2) -> pod default/web (10.0.1.1): allowed\n  \
         egress of the source: allowed: no policy isolates the pod\n  \
         ingress of the destination: allowed by default/a ingress[1], default/a ingress[2] \
         (isolated by default/a, default/b)"
    );

    // Isolated and nothing allows it: denied, with the isolating policies named.
    let v = set
        .explain(&pod("default/web"), &ip("203.0.113.7"), 443, TCP)
        .expect("explain");
    assert!(!v.allowed);
    assert_eq!(
        v.egress,
        DirectionVerdict::Isolated {
            isolated_by: vec![cluster_model::ObjectKey::new("default", "c")],
            allowed_by: vec![],
        }
    );
    assert_eq!(v.ingress, DirectionVerdict::NotEnforced);
    assert!(
        v.to_string()
            .contains("denied: isolated by default/c, and no rule allows it")
    );

    let v = set
        .explain(&node("node-a"), &pod("default/web"), 8080, TCP)
        .expect("explain");
    assert_eq!(v.ingress, DirectionVerdict::Exempt(Exemption::OwnNode));
    assert_eq!(v.egress, DirectionVerdict::NotEnforced);
}

#[test]
fn unknown_peers_are_errors() {
    let snap = snapshot(&[]);
    assert_eq!(
        explain(&snap, &pod("default/nope"), &pod("default/web"), 80, TCP),
        Err(ExplainError::UnknownPod(cluster_model::ObjectKey::new(
            "default", "nope"
        )))
    );
    assert_eq!(
        explain(&snap, &pod("default/web"), &node("node-z"), 80, TCP),
        Err(ExplainError::UnknownNode("node-z".to_string()))
    );
}
