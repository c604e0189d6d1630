//! An identity of its own for each controller, so that the apiserver counts its writes apart
//! from everyone else's on a shared control plane: a ServiceAccount with the controller's RBAC,
//! a token for it (TokenRequest), a kubeconfig, and two FlowSchemas that route exactly its writes
//! and its reads to the priority level every ServiceAccount gets by default (`workload-low`, as
//! the `service-accounts` FlowSchema does), where `apiserver_flowcontrol_dispatched_requests_total`
//! counts them under the FlowSchemas' names.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::flowcontrol::v1::FlowSchema;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NAMESPACE: &str = "default";
/// Just before the `service-accounts` FlowSchema (9000), which would take these otherwise.
const PRECEDENCE: i32 = 8000;
/// Tokens outlive any run.
const TOKEN_SECONDS: i64 = 6 * 3600;
/// The verbs that write, as RBAC and FlowSchemas name them (an apply is a `patch`).
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];
/// The verbs that read.
const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

/// The RBAC an identity gets.
pub enum Grant {
    /// A ClusterRole that exists (deploy/rbac.yaml's `safe-detach`).
    ClusterRole(&'static str),
    /// A ClusterRole made for it with these rules, deleted with it.
    Rules(Value),
}

/// One controller's identity; dropping it removes what it made.
pub struct Identity {
    /// The ServiceAccount's name, also the name of its binding, its role and its writes'
    /// FlowSchema.
    pub name: String,
    kubeconfig: PathBuf,
    made_role: bool,
    _dir: tempfile::TempDir,
}

impl Identity {
    pub async fn create(client: &Client, name: &str, grant: Grant) -> Self {
        let role = match &grant {
            Grant::ClusterRole(role) => (*role).to_owned(),
            Grant::Rules(rules) => {
                let role: ClusterRole = serde_json::from_value(json!({
                    "metadata": { "name": name },
                    "rules": rules,
                }))
                .expect("a ClusterRole");
                Api::<ClusterRole>::all(client.clone())
                    .create(&PostParams::default(), &role)
                    .await
                    .unwrap_or_else(|e| panic!("create ClusterRole {name}: {e}"));
                name.to_owned()
            }
        };
        let accounts = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE);
        let account: ServiceAccount =
            serde_json::from_value(json!({ "metadata": { "name": name } })).expect("an account");
        accounts
            .create(&PostParams::default(), &account)
            .await
            .unwrap_or_else(|e| panic!("create ServiceAccount {name}: {e}"));
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
            "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": NAMESPACE }],
        }))
        .expect("a ClusterRoleBinding");
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .unwrap_or_else(|e| panic!("create ClusterRoleBinding {name}: {e}"));
        let schemas = Api::<FlowSchema>::all(client.clone());
        for (schema, verbs) in [
            (name.to_owned(), &WRITE_VERBS[..]),
            (reads_schema(name), &READ_VERBS[..]),
        ] {
            create_flow_schema(&schemas, &schema, name, verbs).await;
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(TOKEN_SECONDS),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("a token for ServiceAccount {name}: {e}"))
            .status
            .and_then(|status| status.token)
            .expect("a TokenRequest answers with a token");
        let dir = tempfile::Builder::new()
            .prefix("peer-identity-")
            .tempdir()
            .expect("a temporary directory");
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&kubeconfig, &token).await;
        Self {
            name: name.to_owned(),
            kubeconfig,
            made_role: matches!(grant, Grant::Rules(_)),
            _dir: dir,
        }
    }

    /// The FlowSchema its writes are counted under.
    pub fn writes_flow(&self) -> &str {
        &self.name
    }

    /// The FlowSchema its reads (get, list, watch) are counted under.
    pub fn reads_flow(&self) -> String {
        reads_schema(&self.name)
    }

    /// `system:serviceaccount:default:<name>`.
    pub fn user(&self) -> String {
        format!("system:serviceaccount:{NAMESPACE}:{}", self.name)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client with this identity.
    pub async fn client(&self) -> Client {
        let read = Kubeconfig::read_from(&self.kubeconfig).expect("the identity's kubeconfig");
        let config = Config::from_custom_kubeconfig(read, &KubeConfigOptions::default())
            .await
            .expect("the identity's configuration");
        Client::try_from(config).expect("a client")
    }
}

impl Drop for Identity {
    /// Removes the account, its binding, its role (if made for it) and its FlowSchema.
    fn drop(&mut self) {
        let (name, made_role) = (self.name.clone(), self.made_role);
        // `drop` cannot await: a thread with a runtime and a client of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up");
            runtime.block_on(async {
                let client = crate::support::cluster::admin_client().await;
                let params = DeleteParams::default();
                let schemas = Api::<FlowSchema>::all(client.clone());
                let _ = schemas.delete(&name, &params).await;
                let _ = schemas.delete(&reads_schema(&name), &params).await;
                let _ = Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(&name, &params)
                    .await;
                if made_role {
                    let _ = Api::<ClusterRole>::all(client.clone())
                        .delete(&name, &params)
                        .await;
                }
                let _ = Api::<ServiceAccount>::namespaced(client, NAMESPACE)
                    .delete(&name, &params)
                    .await;
            })
        })
        .join();
    }
}

fn reads_schema(name: &str) -> String {
    format!("{name}-reads")
}

/// Creates a FlowSchema that routes the `verbs` of ServiceAccount `account` to `workload-low`,
/// and waits until the apiserver's flow control has taken it up.
async fn create_flow_schema(schemas: &Api<FlowSchema>, name: &str, account: &str, verbs: &[&str]) {
    let schema: FlowSchema = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "priorityLevelConfiguration": { "name": "workload-low" },
            "matchingPrecedence": PRECEDENCE,
            "distinguisherMethod": { "type": "ByUser" },
            "rules": [{
                "subjects": [{
                    "kind": "ServiceAccount",
                    "serviceAccount": { "name": account, "namespace": NAMESPACE },
                }],
                "resourceRules": [{
                    "verbs": verbs,
                    "apiGroups": ["*"],
                    "resources": ["*"],
                    "clusterScope": true,
                    "namespaces": ["*"],
                }],
            }],
        },
    }))
    .expect("a FlowSchema");
    schemas
        .create(&PostParams::default(), &schema)
        .await
        .unwrap_or_else(|e| panic!("create FlowSchema {name}: {e}"));
    // The apiserver's flow-control configuration takes it up and then reports on it.
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = schemas
            .get(name)
            .await
            .ok()
            .and_then(|s| s.status)
            .is_some_and(|s| !s.conditions.unwrap_or_default().is_empty());
        if seen {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "the apiserver did not take up FlowSchema {name}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A kubeconfig with a bearer token for the admin kubeconfig's (first) cluster.
async fn write_kubeconfig(path: &Path, token: &str) {
    let admin = crate::support::cluster::admin_kubeconfig().await;
    let read = Kubeconfig::read_from(admin).expect("the admin kubeconfig");
    let cluster = read
        .clusters
        .first()
        .expect("the admin kubeconfig names a cluster");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{ "name": "bench", "user": { "token": token } }],
        "contexts": [{ "name": "local", "context": { "cluster": cluster.name, "user": "bench" } }],
        "current-context": "local",
    });
    // JSON is YAML: every kubeconfig reader takes it.
    std::fs::write(path, config.to_string()).expect("write the kubeconfig");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}
