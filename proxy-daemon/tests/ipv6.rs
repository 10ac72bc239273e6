//! IPv6 Services at the socket layer: connect6, sendmsg6, recvmsg6 and getpeername6 on real
//! sockets. Clients are Python processes in the agent's cgroup; backends listen on this host's
//! IPv6 loopback. Also: an IPv6 socket connecting to an IPv4 Service through its IPv4-mapped
//! address, and an unowned address of the IPv6 service CIDR refused.
//!
//! Needs root (BPF, cgroups); without it prints SKIPPED and passes.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{can_run, output_in_cgroup, start, wait_synced};

/// Runs a Python client in `cgroup`; its stdout, or its stderr as the error.
fn python_in(cgroup: &Path, script: &str) -> Result<String, String> {
    let out = output_in_cgroup(cgroup, Command::new("python3").args(["-c", script]));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn manifests(tcp_port: u16, udp_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web6}}
spec:
  clusterIP: fd00:10:96::10
  clusterIPs: [fd00:10:96::10]
  ipFamilies: [IPv6]
  ports:
  - {{name: http, port: 80, targetPort: {tcp_port}}}
  - {{name: dns, port: 53, targetPort: {udp_port}, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web6-1, labels: {{kubernetes.io/service-name: web6}}}}
addressType: IPv6
ports: [{{name: http, port: {tcp_port}}}, {{name: dns, port: {udp_port}, protocol: UDP}}]
endpoints: [{{addresses: ["::1"]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web4}}
spec:
  clusterIP: 10.96.202.10
  ports: [{{name: http, port: 80, targetPort: {tcp_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web4-1, labels: {{kubernetes.io/service-name: web4}}}}
addressType: IPv4
ports: [{{name: http, port: {tcp_port}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
"#
    )
}

#[test]
fn ipv6_services_are_translated_at_the_socket_both_ways() {
    let Some(cgroup_root) = can_run("ipv6_services_are_translated_at_the_socket_both_ways") else {
        return;
    };
    // Backends: a TCP server on [::] (IPv6 and, dual-stack, IPv4) answering "tcp", and a
    // UDP one on [::1] answering each datagram with "udp".
    let tcp = TcpListener::bind("[::]:0").expect("listen tcp");
    let tcp_port = tcp.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in tcp.incoming().map_while(Result::ok) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 16];
            if stream.read(&mut buf).is_ok() {
                let _ = stream.write_all(b"tcp");
            }
        }
    });
    let udp = UdpSocket::bind("[::1]:0").expect("bind udp");
    let udp_port = udp.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            match udp.recv_from(&mut buf) {
                Ok((_, peer)) => {
                    let _ = udp.send_to(b"udp", peer);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("svc.yaml"), manifests(tcp_port, udp_port)).expect("write");
    let manifests = dir.path().to_str().expect("utf-8");
    let (guard, events) = start(
        &cgroup_root,
        "ipv6",
        &[
            "--manifests",
            manifests,
            "--node",
            "n1",
            "--service-cidr",
            "10.96.0.0/16",
            "--service-cidr",
            "fd00:10:96::/112",
        ],
    );
    wait_synced(&events, "both Services programmed", |e| e["frontends"] == 3);
    let cgroup = guard.cgroup.clone();

    // TCP: connected through the Service; getpeername shows the Service, not ::1.
    let got = python_in(
        &cgroup,
        "import socket\n\
         s = socket.create_connection(('fd00:10:96::10', 80), timeout=3)\n\
         s.sendall(b'hi'); print(s.recv(16).decode(), s.getpeername()[0], s.getpeername()[1])",
    );
    assert_eq!(got.as_deref(), Ok("tcp fd00:10:96::10 80"));

    // UDP, unconnected: sendmsg6 translates, recvmsg6 makes the answer come from the Service.
    let got = python_in(
        &cgroup,
        "import socket\n\
         u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout(3)\n\
         u.sendto(b'ping', ('fd00:10:96::10', 53)); data, peer = u.recvfrom(64)\n\
         print(data.decode(), peer[0], peer[1])",
    );
    assert_eq!(got.as_deref(), Ok("udp fd00:10:96::10 53"));

    // An IPv6 socket reaching an IPv4 Service by its IPv4-mapped address.
    let got = python_in(
        &cgroup,
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(3)\n\
         s.connect(('::ffff:10.96.202.10', 80)); s.sendall(b'hi')\n\
         print(s.recv(16).decode(), s.getpeername()[0])",
    );
    assert_eq!(got.as_deref(), Ok("tcp ::ffff:10.96.202.10"));

    // An address of the IPv6 service CIDR that no Service owns: refused at once.
    let got = python_in(
        &cgroup,
        "import socket\n\
         try:\n    socket.create_connection(('fd00:10:96::99', 80), timeout=3)\n\
         except ConnectionRefusedError:\n    print('refused')",
    );
    assert_eq!(got.as_deref(), Ok("refused"));
    drop(guard);
}
