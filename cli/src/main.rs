//! `sluice`: the Sluice command line.

fn main() {
    std::process::exit(sluice_cli::main_with_args(std::env::args_os()));
}
