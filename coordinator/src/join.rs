//! Kubelet join, coordinator side: while a placed node has not reported its kubelet joined, every desired state
//! it is sent carries a `JoinInstruction` with a bootstrap token minted for that node alone — from the
//! environment's `join_token_command`, or created through the Kubernetes API with the environment's kubeconfig
//! (a `bootstrap-token-<id>` Secret, 15 minutes). The token travels only inside the tunnel, is never stored
//! and never logged (only its id). Tokens created through the API are deleted once the node reports joined;
//! kube-controller-manager's token cleaner removes the others when they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use nimbus_kube::cluster::{Cluster, CommandTokenSource, KubeCluster, issue_token};
use nimbus_proto::JoinInstruction;
use policy::Credentials;

use crate::context::Ctx;
use crate::placement::DesiredRecord;

/// Lifetime of a bootstrap token minted through the API.
pub const TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest a join-token command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a failed join a fresh token is sent.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Tokens created through the API, by node id: (kubeconfig, token id), to delete after the join.
#[derive(Default)]
pub struct Issued(Mutex<HashMap<String, (String, String)>>);

impl Issued {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The join instruction for node `id` with desired state `d`, or `None` when it needs none (not placed, already
/// joined) or minting failed (logged; the next desired state retries).
pub async fn instruction(ctx: &Ctx, id: &str, d: &DesiredRecord) -> Option<JoinInstruction> {
    let env = d.assignment.as_ref()?.environment.clone();
    let lookup = id.to_string();
    let (policy, observed) = ctx
        .state(move |s| Ok((s.current_policy()?, s.observed(&lookup)?)))
        .await
        .ok()?;
    let k = policy?.environment(&env)?.kubernetes.clone();
    if observed.is_some_and(|o| o.joined_to(&k.api_endpoint)) {
        return None;
    }
    let minted = match (&k.join_token_command, &k.credentials) {
        (Some(argv), _) => CommandTokenSource {
            argv: argv.clone(),
            timeout: COMMAND_TIMEOUT,
        }
        .fetch()
        .await
        .map(|t| (t, None)),
        (None, Credentials::Kubeconfig(path)) => match KubeCluster::from_kubeconfig(path).await {
            Ok(cluster) => issue_token(&cluster, TOKEN_TTL, &format!("polynimbus join of node {id}"))
                .await
                .map(|t| (t, Some(path.clone()))),
            Err(e) => Err(e),
        },
        (None, Credentials::TokenCommand(_)) => {
            tracing::error!(
                node_id = %id,
                environment = %env,
                "cannot mint a bootstrap token: environment {env} gives API access only through a bearer-token \
                 command; add `join_token_command` or a kubeconfig to its kubernetes settings"
            );
            return None;
        }
    };
    let (token, kubeconfig) = match minted {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(node_id = %id, environment = %env, error = %e, "bootstrap token not minted; retrying with the next desired state");
            return None;
        }
    };
    tracing::info!(node_id = %id, environment = %env, token_id = token.id(), "bootstrap token minted for the node's join");
    if let Some(path) = kubeconfig {
        ctx.join_tokens
            .lock()
            .insert(id.to_string(), (path, token.id().to_string()));
    }
    let expires = SystemTime::now()
        .checked_add(TOKEN_TTL)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Some(JoinInstruction {
        api_endpoint: k.api_endpoint.clone(),
        ca_cert_hashes: vec![k.ca_cert_hash.clone()],
        token: token.expose(),
        kubeadm_api: k.kubeadm_api.as_str().to_string(),
        token_expires_unix: expires,
    })
}

/// The node reported its kubelet: delete the API token after a join; after a failure (or a join undone by hand
/// on the node: "drifted") send a fresh token (with the same desired state) a little later.
pub async fn reported(ctx: &std::sync::Arc<Ctx>, id: &str, kubelet: &str) {
    match kubelet {
        "joined" => {
            let issued = ctx.join_tokens.lock().remove(id);
            if let Some((path, token_id)) = issued {
                match KubeCluster::from_kubeconfig(&path).await {
                    Ok(c) => match c.delete_bootstrap_token(&token_id).await {
                        Ok(()) => tracing::info!(node_id = %id, token_id, "bootstrap token deleted after the join"),
                        Err(e) => {
                            tracing::warn!(node_id = %id, token_id, error = %e, "bootstrap token not deleted; it expires on its own")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(node_id = %id, error = %e, "bootstrap token not deleted; it expires on its own")
                    }
                }
            }
        }
        "failed" | "drifted" => {
            let (ctx, id) = (std::sync::Arc::clone(ctx), id.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(RETRY_AFTER).await;
                let lookup = id.clone();
                if let Ok(d) = ctx.state(move |s| s.desired(&lookup)).await {
                    tracing::info!(node_id = %id, "sending a fresh bootstrap token after a failed join");
                    crate::placement::push(&ctx, vec![(id, d)]).await;
                }
            });
        }
        _ => {}
    }
}
