//! The reachability matrix of Kubernetes' NetworkPolicy e2e tests: every pod
//! to every pod on given ports and protocols, over real traffic, each cell
//! compared with what `sluice_policy::explain` says the verdict must be.
//!
//! A cell counts as reached when the destination answered or refused (a
//! refusal means the packet got there); dropped traffic times out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};
use cluster_model::{ManifestSource, ObjectKey};
use serde::Serialize;
use sluice_policy::{Peer, PolicySet};

use crate::addr::{Protocol, TargetSpec};
use crate::client::Outcome;
use crate::lab::Lab;

/// One (port, protocol) the matrix covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Case {
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub case: Case,
    /// What policy says (from `explain`).
    pub expected: bool,
    /// What real traffic did: reached (answered or refused) or not.
    pub observed: bool,
    pub outcome: Outcome,
}

impl Cell {
    pub fn agrees(&self) -> bool {
        self.expected == self.observed
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Matrix {
    pub pods: Vec<String>,
    pub cases: Vec<Case>,
    pub cells: Vec<Cell>,
}

fn policy_protocol(protocol: Protocol) -> sluice_policy::Protocol {
    match protocol {
        Protocol::Tcp => sluice_policy::Protocol::Tcp,
        Protocol::Udp => sluice_policy::Protocol::Udp,
    }
}

/// Whether a probe's outcome means the packet reached the destination.
pub fn reached(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::Answered | Outcome::Refused)
}

impl Matrix {
    /// Probes every ordered pair of running pods with an address (itself
    /// included, as upstream's matrix does) for every case.
    pub fn measure(lab: &Lab, cases: &[Case], timeout: Duration) -> Result<Matrix> {
        let state = lab.state()?;
        let pods: Vec<(String, std::net::Ipv4Addr)> = state
            .pods
            .iter()
            .filter_map(|p| Some((p.key(), p.ip?)))
            .collect();
        let snapshot = ManifestSource::new(lab.paths().cluster()).reload().snapshot;
        let policies = PolicySet::new(&snapshot);

        let mut cells = Vec::new();
        // One thread per (source, destination): denied cells wait for their
        // timeout, so the matrix takes about cases × timeout.
        let pairs: Vec<(&String, &String, std::net::Ipv4Addr)> = pods
            .iter()
            .flat_map(|(from, _)| pods.iter().map(move |(to, ip)| (from, to, *ip)))
            .collect();
        let rows: Vec<Result<Vec<Cell>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|&(from, to, ip)| {
                    let policies = &policies;
                    scope.spawn(move || -> Result<Vec<Cell>> {
                        let (ns, name) = to.split_once('/').unwrap_or(("default", to));
                        let mut row = Vec::new();
                        for case in cases {
                            let verdict = policies
                                .explain(
                                    &pod_peer(from),
                                    &Peer::Pod(ObjectKey::new(ns, name)),
                                    case.port,
                                    policy_protocol(case.protocol),
                                )
                                .with_context(|| format!("explaining {from} -> {to}"))?;
                            let target = TargetSpec {
                                host: SocketAddrV4::new(ip, case.port).ip().to_string(),
                                port: case.port,
                                protocol: case.protocol,
                            };
                            let probe = lab.probe_target(from, &target, timeout)?;
                            row.push(Cell {
                                from: from.clone(),
                                to: to.clone(),
                                case: *case,
                                expected: verdict.allowed,
                                observed: reached(probe.outcome),
                                outcome: probe.outcome,
                            });
                        }
                        Ok(row)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a probe thread panicked")))
                })
                .collect()
        });
        for row in rows {
            cells.extend(row?);
        }
        Ok(Matrix {
            pods: pods.into_iter().map(|(k, _)| k).collect(),
            cases: cases.to_vec(),
            cells,
        })
    }

    pub fn disagreements(&self) -> usize {
        self.cells.iter().filter(|c| !c.agrees()).count()
    }

    /// One table per case: rows are sources, columns destinations; `.`
    /// reached, `X` not reached; `!` marks a cell where the kernel and
    /// `explain` disagree (the letter is what traffic did).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let width = self.pods.iter().map(String::len).max().unwrap_or(0);
        let index: BTreeMap<(&str, &str, Case), &Cell> = self
            .cells
            .iter()
            .map(|c| ((c.from.as_str(), c.to.as_str(), c.case), c))
            .collect();
        for case in &self.cases {
            let _ = writeln!(out, "\n{}/{}", case.port, case.protocol);
            let _ = write!(out, "{:width$} ", "");
            for (i, _) in self.pods.iter().enumerate() {
                let _ = write!(out, " {:>3}", i + 1);
            }
            out.push('\n');
            for (i, from) in self.pods.iter().enumerate() {
                let _ = write!(out, "{from:width$} ");
                for to in &self.pods {
                    let cell = index.get(&(from.as_str(), to.as_str(), *case));
                    let mark = match cell {
                        Some(c) => format!(
                            "{}{}",
                            if c.agrees() { " " } else { "!" },
                            if c.observed { "." } else { "X" }
                        ),
                        None => " ?".into(),
                    };
                    let _ = write!(out, "  {mark}");
                }
                let _ = writeln!(out, "   ({})", i + 1);
            }
        }
        let _ = writeln!(
            out,
            "\n. reached  X not reached  ! the kernel disagrees with explain ({} of {} cells)",
            self.disagreements(),
            self.cells.len()
        );
        out
    }
}

fn pod_peer(key: &str) -> Peer {
    if let Ok(addr) = key.parse::<IpAddr>() {
        return Peer::Ip(addr);
    }
    let (ns, name) = key.split_once('/').unwrap_or(("default", key));
    Peer::Pod(ObjectKey::new(ns, name))
}
