use clap::{Parser, Subcommand};
use futures::FutureExt;
use safe_detach::api::parse_duration;
use safe_detach::config::Config;
use safe_detach::reconcile::Stopped;
use safe_detach::runtime::api_rate;
use safe_detach::runtime::health::{self, Health};
use safe_detach::runtime::leader;
use safe_detach::runtime::metrics::Metrics;
use safe_detach::runtime::telemetry::{self, LogColor, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{error, info, warn};

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
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The driver configuration file (see docs/drivers.md).
    #[arg(long, env = "SAFE_DETACH_CONFIG")]
    config: PathBuf,
    /// Manage only the Volumes and VolumeAttachments that match this label selector
    /// (for example `storage=rack-1`): one operator per backend or shard.
    #[arg(long, env = "SAFE_DETACH_SELECTOR")]
    selector: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(
        long,
        default_value = "127.0.0.1:8080",
        env = "SAFE_DETACH_HTTP_ADDRESS"
    )]
    http_address: SocketAddr,
    /// Act only while holding the Lease `--lease-namespace/--lease-name`, so that of several
    /// replicas exactly one acts.
    #[arg(long, env = "SAFE_DETACH_LEADER_ELECT")]
    leader_elect: bool,
    #[arg(long, default_value = "safe-detach", env = "POD_NAMESPACE")]
    lease_namespace: String,
    #[arg(long, default_value = "safe-detach")]
    lease_name: String,
    /// How long a silent leader keeps the lease before another replica takes over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: std::time::Duration,
    /// This replica's name in the election (default: the pod name, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "SAFE_DETACH_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Colour in text logs: on a terminal only (auto), always, or never.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "SAFE_DETACH_LOG_COLOR"
    )]
    log_color: LogColor,
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
        Command::Run(args) => {
            telemetry::init(args.log_format, args.log_color);
            match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime.block_on(run(args)),
                Err(error) => {
                    error!(%error, "cannot start the runtime");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(args: RunArgs) -> ExitCode {
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::default());
    let config = match Config::load(&args.config, metrics.clone()).await {
        Ok(config) => config,
        Err(error) => {
            error!(%error, "invalid configuration");
            return ExitCode::FAILURE;
        }
    };
    // The lease's own client, unbounded, and the controllers', within `kubeApiQps`.
    let clients =
        futures::future::try_join(api_rate::client(None), api_rate::client(config.api_rate));
    let (lease_client, client) = match clients.await {
        Ok(clients) => clients,
        Err(error) => {
            error!(%error, "cannot build a Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = shutdown_signal().shared();
    let server = tokio::spawn({
        let (health, metrics, shutdown) = (health.clone(), metrics.clone(), shutdown.clone());
        async move {
            if let Err(error) = health::serve(args.http_address, health, metrics, shutdown).await {
                error!(%error, address = %args.http_address, "cannot serve metrics and health");
            }
        }
    });
    info!(drivers = ?config.drivers.keys().collect::<Vec<_>>(), address = %args.http_address, "starting");

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let mut leadership = None;
    if args.leader_elect {
        let joined = leader::join(
            lease_client,
            &args.lease_namespace,
            &args.lease_name,
            identity.clone(),
            args.lease_duration,
        )
        .await;
        let mut joined = match joined {
            Ok(joined) => joined,
            Err(error) => {
                error!(%error, "cannot join the leader election");
                return ExitCode::FAILURE;
            }
        };
        // A follower is ready: it is standing by, as it should.
        health.set_ready(true);
        tokio::select! {
            acquired = joined.acquired() => if !acquired {
                error!("the leader election ended without this replica acting");
                return ExitCode::FAILURE;
            },
            // The lease may have been taken a moment ago: give it up for the next replica.
            _ = shutdown.clone() => {
                joined.release().await;
                return ExitCode::SUCCESS;
            }
        }
        health.set_ready(false);
        leadership = Some(joined);
    }

    let fence = leadership
        .as_ref()
        .map_or_else(leader::Fence::open, leader::Leadership::fence);
    let controllers = safe_detach::reconcile::run(
        client,
        config,
        args.selector,
        health,
        metrics,
        safe_detach::reconcile::Replica {
            instance: identity,
            fence,
        },
        shutdown.clone(),
    );
    let (code, stopped) = match leadership.as_mut() {
        None => (ExitCode::SUCCESS, controllers.await),
        Some(leadership) => tokio::select! {
            stopped = controllers => (ExitCode::SUCCESS, stopped),
            // Stop acting at once: the reconciles under way are dropped where they stand. Each
            // wrote its intent before calling the driver, so the next leader resumes from it.
            _ = leadership.lost() => {
                error!("lost the lease: stopping at once");
                (ExitCode::FAILURE, Stopped::CutShort)
            }
        },
    };
    server.abort();
    if let Some(leadership) = leadership {
        if stopped == Stopped::Drained {
            leadership.release().await;
        } else {
            // A driver call dropped here may still be under way at the backend (a CSI plugin
            // need not stop on a cancelled call): giving the lease up now would let the next
            // leader probe and act meanwhile. The process ends without releasing it, and the next
            // leader takes over once the lease has run out.
            warn!(
                "reconciles were cut short: leaving the lease to run out rather than releasing it"
            );
            std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
        }
    }
    code
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "safe-detach".into());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or SIGINT: the controllers then finish the reconciles under way. A second
/// signal ends the process at once.
async fn shutdown_signal() {
    signalled().await;
    info!("shutting down");
    tokio::spawn(async {
        signalled().await;
        error!("a second signal: exiting at once");
        std::process::exit(1);
    });
}

/// The next SIGTERM or SIGINT.
async fn signalled() {
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
}
