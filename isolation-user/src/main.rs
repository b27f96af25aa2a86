use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = isolation_user::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISOLATION_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match isolation_user::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One sentence: the context chain, outermost first, no backtrace.
            eprintln!("isolation-user: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
