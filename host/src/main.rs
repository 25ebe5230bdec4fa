use std::process::ExitCode;

fn main() -> ExitCode {
    aq_host::cli::main()
}
