//! `kubectl safe-detach`: a kubectl plugin for people who look after safe-detach's attachments.
//! It reads the same objects as the operator, through the same API types, and asks for a
//! force-detach the only way the operator takes one: a new token in the annotation. It never
//! writes a status.

mod outcome;
mod render;
mod report;
mod token;

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, Resource, ResourceExt};
use safe_detach::api::{
    FORCE_DETACH_ANNOTATION, Volume, VolumeAttachment, find_condition, parse_duration, types,
};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::Instant;

use outcome::{Aftermath, ForceReport, Progress};

/// The annotation that carries a person's reason next to the token. Informational: the operator
/// does not read it; the plugin writes it with each request it makes, or removes an old one.
pub const FORCE_DETACH_REASON_ANNOTATION: &str = "safedetach.io/force-detach-reason";

/// Inspect safe-detach's volume attachments and force stuck ones loose through the backend.
#[derive(Parser)]
#[command(name = "kubectl safe-detach", version)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    // Not read from $KUBECONFIG here: the client's loader does that, list of files included.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Ask the operator to force-detach an attachment: it cuts the node off through the backend
    /// and records Detached only once the backend confirms. Writes a fresh token in the
    /// safedetach.io/force-detach annotation (and --reason in safedetach.io/force-detach-reason).
    Force(ForceArgs),
    /// Show attachments: phase, the backend's last answer, the stuck clock, the force-detach
    /// record, and for one that needs a person why and what to do.
    Status(StatusArgs),
    /// Show backend connections that no attachment claims, across Volumes.
    Orphans(OrphansArgs),
}

#[derive(Args)]
struct ForceArgs {
    /// The VolumeAttachment (volumeattachments.safedetach.io).
    name: String,
    /// Why, for the people who read the attachment later (informational; the operator does not
    /// read it).
    #[arg(long)]
    reason: Option<String>,
    /// Use this token instead of a fresh one; refused if it was handled already, is the current
    /// request, or would be rejected.
    #[arg(long)]
    token: Option<String>,
    /// Follow the attachment until the backend confirms the force-detach, then say whether it
    /// was attached again.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. 90s or 2m.
    #[arg(long, default_value = "2m", value_parser = parse_duration, requires = "wait")]
    timeout: Duration,
}

#[derive(Args)]
struct StatusArgs {
    /// One VolumeAttachment; all of them when left out.
    name: Option<String>,
    /// Only attachments matching this label selector.
    #[arg(short = 'l', long, conflicts_with = "name")]
    selector: Option<String>,
    /// The operator's defaultStuckAfter, for Volumes that set no stuckAfter (default: the
    /// documented 2m, shown as an assumption).
    #[arg(long, value_parser = parse_duration)]
    default_stuck_after: Option<Duration>,
}

#[derive(Args)]
struct OrphansArgs {
    /// Only Volumes matching this label selector.
    #[arg(short = 'l', long)]
    selector: Option<String>,
}

/// The condition of `type_` on an attachment.
pub fn report_condition<'a>(a: &'a VolumeAttachment, type_: &str) -> Option<&'a Condition> {
    find_condition(&a.status.as_ref()?.conditions, type_)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = client(&cli.global).await?;
    let output = cli.global.output;
    match cli.command {
        Command::Force(args) => force(client, args, output).await,
        Command::Status(args) => status(client, args, output).await,
        Command::Orphans(args) => orphans(client, args, output).await,
    }
}

async fn client(global: &Global) -> Result<Client, String> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &global.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read the kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| format!("cannot use the kubeconfig {}: {e}", path.display()))?
        }
        None if global.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| format!("cannot use the kubeconfig: {e}"))?,
        None => Config::infer()
            .await
            .map_err(|e| format!("no cluster to talk to: {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("cannot build a client: {e}"))
}

fn print<T: Serialize>(
    value: &T,
    output: Output,
    table: impl FnOnce() -> String,
) -> Result<(), String> {
    let text = match output {
        Output::Table => table(),
        Output::Json => {
            serde_json::to_string_pretty(value).map_err(|e| format!("cannot print JSON: {e}"))?
                + "\n"
        }
        Output::Yaml => {
            serde_saphyr::to_string(value).map_err(|e| format!("cannot print YAML: {e}"))?
        }
    };
    print!("{text}");
    Ok(())
}

fn not_found(name: &str) -> String {
    format!(
        "VolumeAttachment {name:?} not found (kubectl get volumeattachments.safedetach.io lists them)"
    )
}

async fn get_attachment(
    api: &Api<VolumeAttachment>,
    name: &str,
) -> Result<VolumeAttachment, String> {
    api.get_opt(name)
        .await
        .map_err(|e| format!("cannot read VolumeAttachment {name}: {e}"))?
        .ok_or_else(|| not_found(name))
}

async fn force(client: Client, args: ForceArgs, output: Output) -> Result<(), String> {
    let api: Api<VolumeAttachment> = Api::all(client);
    let name = &args.name;
    // A write that names the resourceVersion it checked the token against: if the attachment
    // changed meanwhile (a token handled, the annotation set), the check is made again.
    let mut tries = 0;
    let (token, uid) = loop {
        tries += 1;
        let attachment = get_attachment(&api, name).await?;
        let token = match &args.token {
            Some(token) => token::check(&attachment, token).map(|()| token.clone()),
            None => token::fresh(&attachment, Timestamp::now(), random),
        }
        .map_err(|refusal| format!("will not force-detach {name}: {refusal}"))?;
        let patch = json!({
            "metadata": {
                "resourceVersion": attachment.metadata.resource_version,
                "annotations": {
                    FORCE_DETACH_ANNOTATION: token,
                    FORCE_DETACH_REASON_ANNOTATION: args.reason,
                },
            },
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => break (token, attachment.metadata.uid.unwrap_or_default()),
            Err(kube::Error::Api(e)) if e.code == 409 && tries < 5 => continue,
            Err(kube::Error::Api(e)) if e.code == 404 => return Err(not_found(name)),
            Err(e) => return Err(format!("cannot annotate VolumeAttachment {name}: {e}")),
        }
    };
    if !args.wait {
        let requested = json!({ "name": name, "token": token, "requested": true });
        return print(&requested, output, || {
            format!(
                "requested a force-detach of {name} with token {token}; follow it with `kubectl safe-detach status {name}`\n"
            )
        });
    }
    let report = follow(&api, name, &uid, &token, args.reason, args.timeout).await?;
    print(&report, output, || outcome::render_force(&report))
}

/// Follows the attachment through a watch (which sees every version, so the confirming one is
/// seen even when the attachment is released right after it) until the token's outcome.
async fn follow(
    api: &Api<VolumeAttachment>,
    name: &str,
    uid: &str,
    token: &str,
    reason: Option<String>,
    timeout: Duration,
) -> Result<ForceReport, String> {
    let give_up = Instant::now() + timeout;
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api.clone(), config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut last: Option<VolumeAttachment> = None;
    let mut last_error = None;
    let mut confirmed = None;
    let mut seen_in_list = false;
    loop {
        let next = tokio::time::timeout_at(give_up, stream.next()).await;
        let event = match next {
            Err(_) => break,
            Ok(None) => {
                return Err(format!("the watch of {name} ended"));
            }
            Ok(Some(Err(e))) => {
                last_error = Some(e.to_string());
                continue;
            }
            Ok(Some(Ok(event))) => event,
        };
        // Present after this event, or gone; `None`: no news.
        let seen: Option<Option<VolumeAttachment>> = match event {
            watcher::Event::Init => {
                seen_in_list = false;
                None
            }
            watcher::Event::InitApply(a) => {
                seen_in_list = true;
                Some(Some(a))
            }
            watcher::Event::InitDone if !seen_in_list => Some(None),
            watcher::Event::InitDone => None,
            watcher::Event::Apply(a) => Some(Some(a)),
            watcher::Event::Delete(a) => {
                // The last version is the one the finalizer release left: read it, then gone.
                if confirmed.is_none()
                    && let Progress::Confirmed(c) = outcome::progress(Some(&a), uid, token)
                {
                    confirmed = Some(c);
                }
                Some(None)
            }
        };
        let Some(seen) = seen else { continue };
        if let Some(a) = &seen {
            last = Some(a.clone());
        }
        if confirmed.is_none() {
            match outcome::progress(seen.as_ref(), uid, token) {
                Progress::Confirmed(c) => confirmed = Some(c),
                Progress::Refused(why) => return Err(format!("force-detach of {name}: {why}")),
                Progress::Gone => {
                    return Err(format!(
                        "VolumeAttachment {name} is gone and the force-detach with token {token} was not seen to finish: the operator releases an attachment only after the backend confirms its detach (a safe detach may have come first), unless its finalizer was removed by hand"
                    ));
                }
                Progress::NotTaken | Progress::Running { .. } => continue,
            }
        }
        let afterwards = outcome::aftermath(seen.as_ref(), uid);
        if let Some(c) = &confirmed
            && outcome::settled(&afterwards)
        {
            return Ok(force_report(name, &last, token, reason, c, afterwards));
        }
    }
    // Out of time: a confirmed force-detach is a success whatever came after it.
    if let Some(c) = &confirmed {
        let afterwards = outcome::aftermath(last.as_ref(), uid);
        return Ok(force_report(name, &last, token, reason, c, afterwards));
    }
    Err(timeout_message(
        name,
        token,
        timeout,
        last.as_ref(),
        uid,
        last_error,
    ))
}

fn force_report(
    name: &str,
    last: &Option<VolumeAttachment>,
    token: &str,
    requested_reason: Option<String>,
    confirmed: &outcome::Confirmed,
    afterwards: Aftermath,
) -> ForceReport {
    ForceReport {
        name: name.to_owned(),
        volume: last
            .as_ref()
            .map(|a| a.spec.volume_name.clone())
            .unwrap_or_default(),
        node: last
            .as_ref()
            .map(|a| a.spec.node_name.clone())
            .unwrap_or_default(),
        token: token.to_owned(),
        requested_reason,
        confirmed: confirmed.clone(),
        afterwards,
    }
}

/// Why `--wait` gave up, with what the operator said last.
pub fn timeout_message(
    name: &str,
    token: &str,
    timeout: Duration,
    last: Option<&VolumeAttachment>,
    uid: &str,
    watch_error: Option<String>,
) -> String {
    let mut out = format!(
        "timed out after {} waiting for the backend to confirm the force-detach of {name} (token {token})",
        report::human(timeout)
    );
    match outcome::progress(last, uid, token) {
        Progress::NotTaken => out.push_str(
            ": the operator has not taken the request yet (is an operator running for this attachment?)",
        ),
        Progress::Running { attempts, message } => {
            out.push_str(&format!(": in progress, {attempts} attempt(s)"));
            if let Some(m) = message {
                out.push_str(&format!("; the backend said last: {m}"));
            }
        }
        _ => {}
    }
    if let Some(ready) = last.and_then(|a| report_condition(a, types::READY)) {
        out.push_str(&format!(
            "; Ready={} {}: {}",
            ready.status, ready.reason, ready.message
        ));
    }
    if let Some(e) = watch_error {
        out.push_str(&format!("; the watch failed last with: {e}"));
    }
    out
}

/// A random number from the standard library's OS-seeded hasher keys: enough to tell two tokens
/// of the same second apart, without a dependency.
fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

async fn status(client: Client, args: StatusArgs, output: Output) -> Result<(), String> {
    let attachments_api: Api<VolumeAttachment> = Api::all(client.clone());
    let volumes_api: Api<Volume> = Api::all(client);
    let now = Timestamp::now();
    match &args.name {
        Some(name) => {
            let attachment = get_attachment(&attachments_api, name).await?;
            let volume = volumes_api
                .get_opt(&attachment.spec.volume_name)
                .await
                .map_err(|e| format!("cannot read Volume {}: {e}", attachment.spec.volume_name))?;
            let r = report::attachment_report(
                &attachment,
                volume.as_ref(),
                args.default_stuck_after,
                now,
            );
            print(&r, output, || render::status_detail(&r, now))
        }
        None => {
            let mut params = ListParams::default();
            if let Some(selector) = &args.selector {
                params = params.labels(selector);
            }
            let attachments = list(&attachments_api, &params, "VolumeAttachments").await?;
            let volumes: BTreeMap<String, Volume> =
                list(&volumes_api, &ListParams::default(), "Volumes")
                    .await?
                    .into_iter()
                    .map(|v| (v.metadata.name.clone().unwrap_or_default(), v))
                    .collect();
            let reports: Vec<_> = attachments
                .iter()
                .map(|a| {
                    report::attachment_report(
                        a,
                        volumes.get(&a.spec.volume_name),
                        args.default_stuck_after,
                        now,
                    )
                })
                .collect();
            print(&reports, output, || render::status_table(&reports, now))
        }
    }
}

async fn list<K>(api: &Api<K>, params: &ListParams, what: &str) -> Result<Vec<K>, String>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut items = api
        .list(params)
        .await
        .map_err(|e| format!("cannot list {what}: {e}"))?
        .items;
    items.sort_by_key(|item| item.name_any());
    Ok(items)
}

async fn orphans(client: Client, args: OrphansArgs, output: Output) -> Result<(), String> {
    let api: Api<Volume> = Api::all(client);
    let mut params = ListParams::default();
    if let Some(selector) = &args.selector {
        params = params.labels(selector);
    }
    let volumes = list(&api, &params, "Volumes").await?;
    let reports = report::orphan_reports(&volumes, Timestamp::now());
    print(&reports, output, || render::orphans_table(&reports))
}
