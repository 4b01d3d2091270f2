//! `nimbus-agent`: everything lives in the library (`agent::cli`), where tests and test builds reach it.

use std::process::ExitCode;

fn main() -> ExitCode {
    agent::cli::main()
}
