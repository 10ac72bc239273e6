//! Progress on stderr while the benchmarks run: one line per step,
//! `[ingress 6/6] step 3/12 … elapsed 04:05`, so a long run shows where it is and how long it
//! has taken (plain lines, no terminal control: they read the same in a CI log).

use std::fmt::Display;
use std::time::Instant;

pub struct Progress {
    started: Instant,
    scenarios: usize,
    scenario: usize,
    name: &'static str,
    steps: usize,
    step: usize,
}

impl Progress {
    /// For a run of `scenarios` scenarios.
    pub fn new(scenarios: usize) -> Progress {
        Progress {
            started: Instant::now(),
            scenarios,
            scenario: 0,
            name: "",
            steps: 0,
            step: 0,
        }
    }

    /// The next scenario begins; it will take `steps` steps.
    pub fn scenario(&mut self, name: &'static str, steps: usize) {
        self.scenario += 1;
        self.name = name;
        self.steps = steps;
        self.step = 0;
    }

    /// The next step of the current scenario begins.
    pub fn step(&mut self, what: impl Display) {
        self.step += 1;
        eprintln!("{}", self.line(&what.to_string()));
    }

    fn line(&self, what: &str) -> String {
        let secs = self.started.elapsed().as_secs();
        format!(
            "[{} {}/{}] step {}/{} {what} … elapsed {:02}:{:02}",
            self.name,
            self.scenario,
            self.scenarios,
            self.step,
            self.steps,
            secs / 60,
            secs % 60
        )
    }

    /// The closing line.
    pub fn done(&self) {
        let secs = self.started.elapsed().as_secs();
        eprintln!(
            "[done] {} scenarios in {:02}:{:02}",
            self.scenarios,
            secs / 60,
            secs % 60
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_names_scenario_and_step() {
        let mut p = Progress::new(3);
        p.scenario("ingress", 12);
        p.step = 3;
        let line = p.line("1000 hosts, HTTP/2");
        let clock = line
            .strip_prefix("[ingress 1/3] step 3/12 1000 hosts, HTTP/2 … elapsed ")
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            clock.len() >= 5 && clock.as_bytes()[clock.len() - 3] == b':',
            "{line}"
        );
    }
}
