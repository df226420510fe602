//! The `cph-cache` binary: command line → config → telemetry → run.
//!
//! Exit codes: 0 after a clean shutdown or a valid `check`; 2 for a config error (the message
//! names the key, and the line where the TOML parser gives one); 1 for anything else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cph_cache::{App, Config, Listeners, Secrets, telemetry};
use prometheus::Registry;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "cph-cache",
    version,
    about = "Caching sidecar for the Huawei Cloud CPH image-list API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Serve {
        /// Config file [default: $CPH_CACHE_CONFIG, then config/cph-cache.toml]
        #[arg(
            long,
            env = "CPH_CACHE_CONFIG",
            default_value = "config/cph-cache.toml"
        )]
        config: PathBuf,
    },
    /// Validate a config file: exit 0, or 2 with a message naming the offending key.
    Check {
        #[arg(
            long,
            env = "CPH_CACHE_CONFIG",
            default_value = "config/cph-cache.toml"
        )]
        config: PathBuf,
    },
    /// Run the sidecar in front of an embedded simulated CPH endpoint; prints what to curl.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cph-cache: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("cph-cache: {error}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => runtime.block_on(serve(config)),
        Command::Demo {
            listen,
            admin_listen,
        } => runtime.block_on(async {
            let terminated = match termination() {
                Ok(terminated) => terminated,
                Err(error) => {
                    eprintln!("cph-cache: cannot install signal handlers: {error}");
                    return ExitCode::from(1);
                }
            };
            match cph_cache::demo::run(Some(listen), Some(admin_listen), terminated).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("cph-cache demo: {error}");
                    ExitCode::from(1)
                }
            }
        }),
    }
}

async fn serve(path: PathBuf) -> ExitCode {
    // Signal streams first: until they exist, SIGTERM's default action kills the process, and
    // the "serving" line below tells supervisors (and tests) that signals are now handled.
    let (terminated, mut hangups) = match (termination(), signal(SignalKind::hangup())) {
        (Ok(terminated), Ok(hangups)) => (terminated, hangups),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("cph-cache: cannot install signal handlers: {error}");
            return ExitCode::from(1);
        }
    };
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("cph-cache: {error}");
            return ExitCode::from(2);
        }
    };
    let secrets = match Secrets::from_env(&config.auth) {
        Ok(secrets) => secrets,
        Err(error) => {
            eprintln!("cph-cache: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&config.log);
    let started = async {
        let listeners = Listeners::bind(&config).await?;
        let app = App::new(config.clone(), secrets, Registry::new())?;
        anyhow::Ok((listeners, app))
    };
    let (listeners, app) = match started.await {
        Ok(started) => started,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("cph-cache: {error:#}");
            return ExitCode::from(1);
        }
    };
    let reloader = app.reloader();
    let reloads = tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match Config::load(&path) {
                Ok(new) => reloader.reload(&new),
                Err(error) => {
                    tracing::error!(%error, "reload rejected; keeping the running config")
                }
            }
        }
    });
    app.serve(listeners, terminated).await;
    reloads.abort();
    ExitCode::SUCCESS
}

/// A future that resolves on SIGTERM or SIGINT. The streams are created here, at once, so a
/// signal that arrives before the future is first polled is still caught.
fn termination() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}
