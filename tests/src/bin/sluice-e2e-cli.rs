//! The `sluice` CLI, built by cargo for the end-to-end tests (see Cargo.toml).

fn main() {
    std::process::exit(sluice_cli::main_with_args(std::env::args_os()));
}
