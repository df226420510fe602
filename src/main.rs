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
            match cph_cache::demo::run(Some(listen), Some(admin_listen), terminated()).await {
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
    let bound = |listener: &tokio::net::TcpListener| {
        listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |addr| addr.to_string())
    };
    tracing::info!(
        listen = %bound(&listeners.proxy),
        admin_listen = %bound(&listeners.admin),
        upstream = %config.upstream.endpoint,
        "cph-cache {} serving",
        env!("CARGO_PKG_VERSION")
    );
    let reloader = app.reloader();
    let reloads = tokio::spawn(async move {
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            match Config::load(&path) {
                Ok(new) => reloader.reload(&new),
                Err(error) => {
                    tracing::error!(%error, "reload rejected; keeping the running config")
                }
            }
        }
    });
    app.serve(listeners, terminated()).await;
    reloads.abort();
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
