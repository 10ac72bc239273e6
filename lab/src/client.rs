//! The client side of probe and load, run inside a pod (its netns and cgroup) by the hidden
//! `sluice lab client` subcommand, which prints the result as JSON for the lab to read.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::addr::Protocol;

/// What a probe asks the test server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ask {
    /// The answering pod's name (`GET /hostname`, datagram `hostname`).
    #[default]
    Hostname,
    /// The client address the server saw, "ip:port" (`GET /clientip`, datagram `clientip`).
    ClientIp,
}

impl Ask {
    pub fn as_str(self) -> &'static str {
        match self {
            Ask::Hostname => "hostname",
            Ask::ClientIp => "clientip",
        }
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Answered,
    /// ECONNREFUSED (also EPERM: a cgroup program rejecting the connect/send).
    Refused,
    Timeout,
    /// EHOSTUNREACH / ENETUNREACH.
    Unreachable,
    /// Anything else (reset, bad answer, …); see `error`.
    Error,
}

impl Outcome {
    /// The probe exit code: 0 answered, 1 refused, 2 timeout, 3 unreachable or other error.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Answered => 0,
            Outcome::Refused => 1,
            Outcome::Timeout => 2,
            Outcome::Unreachable | Outcome::Error => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::Error => "error",
        }
    }
}

/// One probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub target: SocketAddr,
    pub protocol: Protocol,
    pub outcome: Outcome,
    /// The answer (the answering pod's name), when answered.
    pub answer: Option<String>,
    /// TCP: what getpeername() returned; UDP: the source address of the reply.
    pub peer: Option<SocketAddr>,
    /// The local address used.
    pub local: Option<SocketAddr>,
    pub latency_us: u64,
    /// The OS error or what was wrong, when not answered.
    pub error: Option<String>,
}

/// Latency summary in microseconds (nearest-rank percentiles).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: u64,
}

impl Latency {
    pub fn of(samples: &[u64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |p: u64| {
            let n = sorted.len() as u64;
            let idx = (p * n).div_ceil(100).clamp(1, n) - 1;
            sorted[idx as usize]
        };
        Latency {
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<u64>() / sorted.len() as u64,
        }
    }
}

/// N sequential attempts from one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub target: SocketAddr,
    pub protocol: Protocol,
    pub count: u64,
    pub answered: u64,
    /// Answers (pod names) and how often each came.
    pub answers: BTreeMap<String, u64>,
    /// Failed attempts by outcome.
    pub failures: BTreeMap<Outcome, u64>,
    /// The first few distinct errors seen.
    pub errors: Vec<String>,
    /// Over answered attempts.
    pub latency_us: Latency,
    /// Every answered attempt's latency, in order.
    pub samples_us: Vec<u64>,
    pub elapsed_ms: u64,
}

/// Probes once: TCP connect + `GET /hostname`; UDP `hostname` from an unconnected socket.
pub fn probe(target: SocketAddr, protocol: Protocol, timeout: Duration) -> ProbeResult {
    probe_asking(target, protocol, Ask::Hostname, timeout)
}

/// Probes once, asking `ask`.
pub fn probe_asking(
    target: SocketAddr,
    protocol: Protocol,
    ask: Ask,
    timeout: Duration,
) -> ProbeResult {
    let started = Instant::now();
    let attempt = match protocol {
        Protocol::Tcp => tcp_attempt(target, ask, timeout),
        Protocol::Udp => udp_attempt(target, ask, timeout),
    };
    let latency_us = started.elapsed().as_micros() as u64;
    match attempt {
        Ok(a) => ProbeResult {
            target,
            protocol,
            outcome: Outcome::Answered,
            answer: Some(a.answer),
            peer: a.peer,
            local: a.local,
            latency_us,
            error: None,
        },
        Err(f) => ProbeResult {
            target,
            protocol,
            outcome: f.outcome,
            answer: None,
            peer: f.peer,
            local: f.local,
            latency_us,
            error: Some(f.message),
        },
    }
}

/// `count` sequential attempts, each with its own timeout.
pub fn load(target: SocketAddr, protocol: Protocol, count: u64, timeout: Duration) -> LoadReport {
    let started = Instant::now();
    let mut report = LoadReport {
        target,
        protocol,
        count,
        answered: 0,
        answers: BTreeMap::new(),
        failures: BTreeMap::new(),
        errors: Vec::new(),
        latency_us: Latency::default(),
        samples_us: Vec::with_capacity(count.min(1 << 20) as usize),
        elapsed_ms: 0,
    };
    for _ in 0..count {
        let t = Instant::now();
        let attempt = match protocol {
            Protocol::Tcp => tcp_attempt(target, Ask::Hostname, timeout),
            Protocol::Udp => udp_attempt(target, Ask::Hostname, timeout),
        };
        let us = t.elapsed().as_micros() as u64;
        match attempt {
            Ok(a) => {
                report.answered += 1;
                *report.answers.entry(a.answer).or_default() += 1;
                report.samples_us.push(us);
            }
            Err(f) => {
                *report.failures.entry(f.outcome).or_default() += 1;
                if report.errors.len() < 10 && !report.errors.contains(&f.message) {
                    report.errors.push(f.message);
                }
            }
        }
    }
    report.latency_us = Latency::of(&report.samples_us);
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

struct Answer {
    answer: String,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

struct Failure {
    outcome: Outcome,
    message: String,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

impl Failure {
    fn io(stage: &str, e: &io::Error) -> Failure {
        Failure {
            outcome: classify(e),
            message: format!("{stage}: {e}"),
            peer: None,
            local: None,
        }
    }
    fn other(message: String) -> Failure {
        Failure {
            outcome: Outcome::Error,
            message,
            peer: None,
            local: None,
        }
    }
}

/// Maps an OS error to an outcome.
pub fn classify(e: &io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) | Some(libc::EPERM) => return Outcome::Refused,
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => return Outcome::Unreachable,
        Some(libc::ETIMEDOUT) => return Outcome::Timeout,
        _ => {}
    }
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        _ => Outcome::Error,
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn timed_out(stage: &str) -> Failure {
    Failure {
        outcome: Outcome::Timeout,
        message: format!("{stage}: timed out"),
        peer: None,
        local: None,
    }
}

fn tcp_attempt(target: SocketAddr, ask: Ask, timeout: Duration) -> Result<Answer, Failure> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| Failure::io("connect", &e))?;
    let peer = stream.peer_addr().ok();
    let local = stream.local_addr().ok();
    let with_addrs = |mut f: Failure| {
        f.peer = peer;
        f.local = local;
        f
    };
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET /{} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n",
        ask.as_str()
    );
    let left = remaining(deadline).ok_or_else(|| with_addrs(timed_out("send")))?;
    stream
        .set_write_timeout(Some(left))
        .map_err(|e| with_addrs(Failure::io("send", &e)))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| with_addrs(Failure::io("send", &e)))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = remaining(deadline).ok_or_else(|| with_addrs(timed_out("receive")))?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| with_addrs(Failure::io("receive", &e)))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                if response.len() > 1 << 20 {
                    return Err(with_addrs(Failure::other("answer too long".into())));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(with_addrs(Failure::io("receive", &e))),
        }
    }
    let answer = parse_http_answer(&response).map_err(|m| with_addrs(Failure::other(m)))?;
    Ok(Answer {
        answer,
        peer,
        local,
    })
}

/// The body of a `200` HTTP response, trimmed.
pub(crate) fn parse_http_answer(response: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(if text.is_empty() {
            "connection closed without an answer".to_string()
        } else {
            format!("malformed HTTP answer: {:?}", truncate(&text, 80))
        });
    };
    let status = head.lines().next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        return Err(format!("HTTP status {:?}", truncate(status, 80)));
    }
    Ok(body.trim().to_string())
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn udp_attempt(target: SocketAddr, ask: Ask, timeout: Duration) -> Result<Answer, Failure> {
    let deadline = Instant::now() + timeout;
    let (any, level, option): (IpAddr, _, _) = match target {
        SocketAddr::V4(_) => (
            Ipv4Addr::UNSPECIFIED.into(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
        ),
        SocketAddr::V6(_) => (
            Ipv6Addr::UNSPECIFIED.into(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVERR,
        ),
    };
    let socket = UdpSocket::bind((any, 0)).map_err(|e| Failure::io("bind", &e))?;
    // Report ICMP errors (port unreachable → ECONNREFUSED) on this unconnected socket.
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket
        .send_to(ask.as_str().as_bytes(), target)
        .map_err(|e| Failure::io("send", &e))?;
    let local = socket.local_addr().ok();
    let mut buf = [0u8; 2048];
    loop {
        let left = remaining(deadline).ok_or_else(|| Failure {
            local,
            ..timed_out("receive")
        })?;
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| Failure::io("receive", &e))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                return Ok(Answer {
                    answer: String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                    peer: Some(from),
                    local,
                });
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Failure {
                    local,
                    ..Failure::io("receive", &e)
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        let l = Latency::of(&samples);
        assert_eq!((l.p50, l.p90, l.p99, l.max, l.mean), (50, 90, 99, 100, 50));
        let one = Latency::of(&[7]);
        assert_eq!((one.p50, one.p99, one.max), (7, 7, 7));
        assert_eq!(Latency::of(&[]), Latency::default());
        let l = Latency::of(&[5, 1, 3]);
        assert_eq!((l.p50, l.p90, l.max), (3, 5, 5));
    }

    #[test]
    fn http_answers() {
        assert_eq!(
            parse_http_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nweb-1"),
            Ok("web-1".into())
        );
        assert!(
            parse_http_answer(b"HTTP/1.1 404 Not Found\r\n\r\nnope")
                .unwrap_err()
                .contains("404")
        );
        assert!(parse_http_answer(b"").unwrap_err().contains("closed"));
        assert!(
            parse_http_answer(b"garbage")
                .unwrap_err()
                .contains("malformed")
        );
    }

    #[test]
    fn classification_and_exit_codes() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify(&e(libc::ECONNREFUSED)), Outcome::Refused);
        assert_eq!(classify(&e(libc::EPERM)), Outcome::Refused);
        assert_eq!(classify(&e(libc::EHOSTUNREACH)), Outcome::Unreachable);
        assert_eq!(classify(&e(libc::ENETUNREACH)), Outcome::Unreachable);
        assert_eq!(classify(&e(libc::EAGAIN)), Outcome::Timeout);
        assert_eq!(classify(&e(libc::ECONNRESET)), Outcome::Error);
        let codes: Vec<i32> = [
            Outcome::Answered,
            Outcome::Refused,
            Outcome::Timeout,
            Outcome::Unreachable,
            Outcome::Error,
        ]
        .iter()
        .map(|o| o.exit_code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 3]);
    }

    #[test]
    fn probe_loopback_refused_and_answered() {
        // Nothing listens on this port: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let r = probe(target, Protocol::Tcp, Duration::from_secs(2));
        assert_eq!(r.outcome, Outcome::Refused, "{r:?}");

        let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = probe(
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), udp_port),
            Protocol::Udp,
            Duration::from_secs(2),
        );
        assert_eq!(
            r.outcome,
            Outcome::Refused,
            "ICMP port unreachable seen via IP_RECVERR: {r:?}"
        );

        // A one-shot HTTP answerer.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..3 {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nme-1");
            }
        });
        let r = probe(target, Protocol::Tcp, Duration::from_secs(2));
        assert_eq!(
            (r.outcome, r.answer.as_deref()),
            (Outcome::Answered, Some("me-1")),
            "{r:?}"
        );
        assert_eq!(r.peer, Some(target));
        let report = load(target, Protocol::Tcp, 2, Duration::from_secs(2));
        assert_eq!(report.answered, 2, "{report:?}");
        assert_eq!(report.answers.get("me-1"), Some(&2));
        assert_eq!(report.samples_us.len(), 2);
    }

    #[test]
    fn probe_over_ipv6_loopback() {
        // Hosts without IPv6 have nothing to test here.
        let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
            return;
        };
        let target = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nme-6");
        });
        let r = probe(target, Protocol::Tcp, Duration::from_secs(2));
        assert_eq!(r.answer.as_deref(), Some("me-6"), "{r:?}");
        assert_eq!(r.local.map(|a| a.is_ipv6()), Some(true));

        let udp_port = std::net::UdpSocket::bind("[::1]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = probe(
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), udp_port),
            Protocol::Udp,
            Duration::from_secs(2),
        );
        assert_eq!(
            r.outcome,
            Outcome::Refused,
            "ICMPv6 port unreachable seen via IPV6_RECVERR: {r:?}"
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(&format!("\"[::1]:{udp_port}\"")), "{json}");
    }
}
