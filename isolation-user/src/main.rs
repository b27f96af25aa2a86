use clap::Parser as _;

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal as _;
    let cli = isolation_user::Cli::parse();
    // The service logs what it does (applies, refusals, drops); a verb only its warnings.
    let service = matches!(cli.command, isolation_user::Cmd::Run(_));
    let stderr_tty = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISOLATION_LOG")
                .unwrap_or_else(|_| if service { "info" } else { "warn" }.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(stderr_tty);
    // Under systemd the journal stamps every line: no second timestamp.
    if service && std::env::var_os("JOURNAL_STREAM").is_some() {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    match isolation_user::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One sentence: the context chain, outermost first, no backtrace.
            eprintln!("isolation-user: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
