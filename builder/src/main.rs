//! The `rbuild` command: parse the command line, run the command, exit with its code.

fn main() -> std::process::ExitCode {
    rbuild_builder::cli::main()
}
