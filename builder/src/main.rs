//! The `rbuild` command: parse the command line, run the command, exit with its code.

fn main() -> std::process::ExitCode {
    // The sandbox helper is this binary re-executed: it must take over before anything else
    // runs (single-threaded, no runtime started).
    rbuild_executor::init::run_if_requested();
    rbuild_builder::cli::main()
}
