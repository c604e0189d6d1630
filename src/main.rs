use clap::{Parser, Subcommand};
use safe_detach::config::Config;
use safe_detach::runtime::telemetry::{self, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::{error, info};

/// safe-detach: a Kubernetes operator that resolves stuck volume attachments, changing the record
/// only after the storage backend confirms.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run {
        /// The driver configuration file (see docs/drivers.md).
        #[arg(long, env = "SAFE_DETACH_CONFIG")]
        config: PathBuf,
        /// Manage only the Volumes and VolumeAttachments that match this label selector
        /// (for example `storage=rack-1`): one operator per backend or shard.
        #[arg(long, env = "SAFE_DETACH_SELECTOR")]
        selector: Option<String>,
        /// Log format.
        #[arg(
            long,
            value_enum,
            default_value = "text",
            env = "SAFE_DETACH_LOG_FORMAT"
        )]
        log_format: LogFormat,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crds => match safe_detach::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: cannot render the CRDs: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            selector,
            log_format,
        } => {
            telemetry::init(log_format);
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(error) => {
                    error!(%error, "invalid configuration");
                    return ExitCode::FAILURE;
                }
            };
            match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime.block_on(run(config, selector)),
                Err(error) => {
                    error!(%error, "cannot start the runtime");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(config: Config, selector: Option<String>) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            error!(%error, "cannot build a Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    info!(drivers = ?config.drivers.keys().collect::<Vec<_>>(), "starting");
    safe_detach::reconcile::run(client, config, selector, shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or SIGINT: the controllers then finish the reconciles under way.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
    info!("shutting down");
}
