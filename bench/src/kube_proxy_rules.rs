//! kube-proxy's data path as a baseline: the rule structure its iptables and
//! nftables modes generate for ClusterIP Services, rendered for
//! `iptables-restore` and `nft -f`. Pure: Services in, rule text out.
//!
//! iptables mode: PREROUTING/OUTPUT → KUBE-SERVICES (one rule per Service
//! port, evaluated in order) → KUBE-SVC-* (masquerade mark for off-cluster
//! sources, then `statistic --mode random` with probabilities 1/n, 1/(n-1),
//! …) → KUBE-SEP-* (hairpin mark, DNAT); KUBE-POSTROUTING masquerades marked
//! packets. nftables mode: one verdict map keyed by (address, protocol,
//! port) → a per-Service chain choosing an endpoint with `numgen random`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// One ClusterIP Service port and its endpoints.
#[derive(Clone, Debug)]
pub struct ClusterIpService {
    /// `namespace/name:port-name`, as kube-proxy writes in comments.
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// Chain-name suffix the way kube-proxy makes one: a hash of the Service
/// port name (kube-proxy: base32 of SHA-256, 16 characters). A stable FNV
/// hash in hex serves the same purpose here.
fn chain_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// `iptables-restore` input for the nat table.
pub fn iptables(services: &[ClusterIpService], cluster_cidr: &str) -> String {
    let mut chains = String::from(
        ":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for svc in services {
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&svc.name));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j {svc_chain}",
            svc.ip, svc.name, svc.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {cluster_cidr} -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            svc.ip, svc.name, svc.port
        );
        let n = svc.endpoints.len();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let sep_chain = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{}:{ip}:{port}", svc.name))
            );
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            let remaining = n - i;
            if remaining > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{} -> {ip}:{port}\" -m statistic --mode random --probability {:.11} -j {sep_chain}",
                    svc.name,
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{} -> {ip}:{port}\" -j {sep_chain}",
                    svc.name
                );
            }
            let _ = writeln!(rules, "-A {sep_chain} -s {ip}/32 -j KUBE-MARK-MASQ");
            let _ = writeln!(
                rules,
                "-A {sep_chain} -p tcp -m tcp -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// `nft -f` input: table `ip kube-proxy`, as kube-proxy's nftables mode.
/// Chains come before whatever jumps to them; the hook chains come last.
pub fn nftables(services: &[ClusterIpService], cluster_cidr: &str) -> String {
    let mut out = String::from(
        "table ip kube-proxy {\n\
         \tchain mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x4000\n\t}\n\
         \tchain masquerading {\n\t\tmeta mark & 0x4000 == 0 return\n\
         \t\tmeta mark set meta mark ^ 0x4000\n\t\tmasquerade fully-random\n\t}\n",
    );
    let mut elements = Vec::with_capacity(services.len());
    for svc in services {
        let chain = format!("service-{}", chain_hash(&svc.name));
        elements.push(format!("{} . tcp . {} : goto {chain}", svc.ip, svc.port));
        let mut endpoints = Vec::with_capacity(svc.endpoints.len());
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let ep_chain = format!(
                "endpoint-{}",
                chain_hash(&format!("{}:{ip}:{port}", svc.name))
            );
            let _ = write!(
                out,
                "\tchain {ep_chain} {{\n\t\tip saddr {ip} jump mark-for-masquerade\n\
                 \t\tmeta l4proto tcp dnat to {ip}:{port}\n\t}}\n"
            );
            endpoints.push(format!("{i} : goto {ep_chain}"));
        }
        let _ = write!(
            out,
            "\tchain {chain} {{\n\t\tip daddr {} tcp dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade\n\
             \t\tnumgen random mod {} vmap {{ {} }}\n\t}}\n",
            svc.ip,
            svc.port,
            svc.endpoints.len().max(1),
            endpoints.join(", ")
        );
    }
    let _ = write!(
        out,
        "\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\
         \t\telements = {{ {} }}\n\t}}\n",
        elements.join(", ")
    );
    out.push_str(
        "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n\
         \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading\n\t}\n}\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> ClusterIpService {
        ClusterIpService {
            name: "default/web:http".into(),
            ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            endpoints: vec![
                (Ipv4Addr::new(10, 244, 0, 3), 8080),
                (Ipv4Addr::new(10, 244, 0, 4), 8080),
                (Ipv4Addr::new(10, 244, 0, 5), 8080),
            ],
        }
    }

    #[test]
    fn iptables_chooses_endpoints_with_kube_proxys_cascading_probabilities() {
        let text = iptables(&[web()], "10.244.0.0/16");
        assert!(text.starts_with("*nat\n") && text.ends_with("COMMIT\n"));
        let probabilities: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap_or_default())
            .collect();
        // 1/3, then 1/2 of the rest, then the last one unconditionally.
        assert_eq!(probabilities, ["0.33333333333", "0.50000000000"]);
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 3);
        assert_eq!(text.matches("-A KUBE-SERVICES -d 10.96.0.10/32").count(), 1);
    }

    #[test]
    fn nftables_maps_each_service_to_a_numgen_chain() {
        let text = nftables(&[web()], "10.244.0.0/16");
        assert!(text.contains("10.96.0.10 . tcp . 80 : goto service-"));
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert_eq!(text.matches("dnat to 10.244.0.").count(), 3);
    }
}
