//! A load client for new TLS connections: every request opens a TCP connection, does a full
//! TLS handshake (session resumption off, so no abbreviated handshakes) with the next host's
//! name as SNI (round-robin over the hosts), sends one HTTP/1.1 GET with `Connection: close`
//! and reads the answer. h2load cannot do this: it keeps its connections and sends one SNI
//! per run.
//!
//! Like h2load it does not verify the certificate chain or the handshake signature, so the
//! load generator costs as little as it can on the machine it shares with the servers; it
//! does check that the certificate served names the SNI host, i.e. that the server picked the
//! right one of its certificates.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use crate::stats::micros;

/// No request waits longer than this for the server (a stuck one counts as failed).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts any chain and signature, but only a certificate that names the SNI host.
#[derive(Debug)]
struct NamesTheHost(Vec<SignatureScheme>);

impl ServerCertVerifier for NamesTheHost {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is in the DER as an IA5String of the subjectAltName: a byte search suffices
        // to tell one generated certificate from another (and from a default certificate).
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::General("no DNS name to check".into()));
        };
        let name = name.as_ref().as_bytes();
        if end_entity.windows(name.len()).any(|w| w == name) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the certificate does not name the SNI host".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

/// The client configuration: TLS 1.2 and 1.3 (1.3 is negotiated by both servers), ALPN
/// http/1.1, no resumption.
pub fn config() -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NamesTheHost(schemes)))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One request on a new connection.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// From connect() to the handshake done (the client's Finished sent).
    pub handshake_us: f64,
    /// From connect() to the whole answer read.
    pub total_us: f64,
}

/// Connects, handshakes, GETs `/` for `host` and checks for a 200 answer with its body.
pub fn request(config: &Arc<ClientConfig>, addr: SocketAddr, host: &str) -> Result<Timing> {
    let start = Instant::now();
    let mut tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let name = ServerName::try_from(host.to_string())?;
    let mut conn = ClientConnection::new(config.clone(), name)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    let handshake = start.elapsed();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-bench\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let complete = loop {
        if let Some(len) = response_len(&buf)?
            && buf.len() >= len
        {
            break true;
        }
        match tls.read(&mut chunk) {
            Ok(0) => break false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A close without close_notify: the answer is judged by what arrived.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break false,
            Err(e) => return Err(e.into()),
        }
    };
    let total = start.elapsed();
    if !buf.starts_with(b"HTTP/1.1 200 ") {
        let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
        bail!("answer: {}", String::from_utf8_lossy(line));
    }
    if !complete {
        bail!("the connection closed before the whole answer");
    }
    // Let the server close first (it was asked to), so it, not the client, holds TIME_WAIT.
    while matches!(tls.read(&mut chunk), Ok(n) if n > 0) {}
    Ok(Timing {
        handshake_us: micros(handshake),
        total_us: micros(total),
    })
}

/// The length of the whole answer once its head is in `buf` (head + Content-Length; the
/// servers answer the backend's fixed body with a Content-Length); `None` before.
fn response_len(buf: &[u8]) -> Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .with_context(|| format!("no Content-Length in the answer: {head}"))?;
    Ok(Some(end + 4 + length))
}

/// What one load run measured.
#[derive(Debug, Default)]
pub struct LoadRun {
    /// Requests (= connections = full handshakes) answered per second in the measured window.
    pub per_second: f64,
    pub total_us: Vec<f64>,
    pub handshake_us: Vec<f64>,
    pub failed: u64,
    /// The first few failures, for the report of a broken run.
    pub errors: Vec<String>,
}

/// `concurrency` threads making requests back to back for `warm_up` (not counted) and then
/// `measure`; a request counts if it ends in the measured window. `mark` is called as the
/// window opens and as it closes (e.g. to read the server's CPU time).
pub fn load(
    config: &Arc<ClientConfig>,
    addr: SocketAddr,
    hosts: &[String],
    concurrency: usize,
    warm_up: Duration,
    measure: Duration,
    mark: &mut dyn FnMut(),
) -> LoadRun {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let (from, until) = (start + warm_up, start + warm_up + measure);
    let run = Mutex::new(LoadRun::default());
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                // Per thread, merged once at the end: no lock on the request path.
                let mut mine = LoadRun::default();
                while Instant::now() < until {
                    let host = &hosts[next.fetch_add(1, Ordering::Relaxed) % hosts.len()];
                    let result = request(config, addr, host);
                    let end = Instant::now();
                    if end < from || end > until {
                        continue;
                    }
                    match result {
                        Ok(t) => {
                            mine.total_us.push(t.total_us);
                            mine.handshake_us.push(t.handshake_us);
                        }
                        Err(e) => {
                            mine.failed += 1;
                            if mine.errors.len() < 3 {
                                mine.errors.push(format!("{host}: {e:#}"));
                            }
                        }
                    }
                }
                let mut run = run.lock().unwrap_or_else(|e| e.into_inner());
                run.total_us.extend(mine.total_us);
                run.handshake_us.extend(mine.handshake_us);
                run.failed += mine.failed;
                run.errors.extend(mine.errors.into_iter().take(3));
            });
        }
        for at in [from, until] {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            mark();
        }
    });
    let mut run = run.into_inner().unwrap_or_else(|e| e.into_inner());
    run.per_second = run.total_us.len() as f64 / measure.as_secs_f64();
    run.errors.truncate(5);
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_length_from_head_and_content_length() {
        assert_eq!(
            response_len(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(),
            None
        );
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(response_len(answer).unwrap(), Some(answer.len()));
        assert!(response_len(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
