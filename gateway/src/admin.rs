//! The admin API: HTTP with JSON on a Unix socket that only root can open, so that
//! `curl --unix-socket /run/fwnp/gateway.sock http://fwnp/v1/status` works and `fwnpctl` needs
//! nothing but the socket. Routes (all answer JSON; errors as `{"error": "..."}` with a 4xx or
//! 5xx status):
//!
//! | method and path | what |
//! | --- | --- |
//! | `GET /v1/status` | epoch, counts, uptime, policy file; the store by backend (`store_backend`: SQLite's database, or etcd's endpoints, prefix, site, applied revision and transaction counts); in a cluster, its members (live or absent, each one's last applied revision and policy version) |
//! | `GET /v1/leases?host=&app=&port=&protocol=&serial=` | live leases with time left, soonest expiry first, then by lease id (`serial`: of the certificate that last opened or renewed them) |
//! | `POST /v1/leases/{id}/revoke` body `{"reason": "..."}` | revoke a lease, notify its host |
//! | `GET /v1/audit?since=&until=&host=&app=&port=&outcome=&kind=&after=&limit=&order=&wait=&scope=` | audit records; `wait` long-polls for records after `after` (follow): this gateway's own after an event id, every member's after a cluster's cursor `SITE:ID,...` (a cluster's page gives one in `follow_from`, each answer the next in `next_cluster_after`); in a cluster a page merges every member's events (`site`) and names in `unreachable` those it may lack, unless `scope=local` |
//! | `POST /v1/policy/reload` | check and load the policy file, re-evaluate live leases; re-read the TLS files and CRL, ending what revoked certificates hold; one reload at a time (a second waits for the first, then runs); in a cluster, `superseded` when another gateway's newer version was put in force first (the file was published, is not in force here, and revoked nothing); 409 when other gateways of the cluster kept publishing theirs, 503 when the cluster's etcd cannot be reached (the old policy stays in force) |
//! | `POST /v1/policy/explain` body `{"host": ID, "addresses": [...], "open": "tcp/8080", "from": [...], "address": ..., "lifetime": 600 or "10m"}` | the decision, the rule, the reason, the trace; 400 naming the field (and the list entry) at fault |
//! | `GET /v1/report?since=&until=` | what hosts and applications asked for, and a suggested policy |
//! | `GET /metrics` | the Prometheus metrics, also here for hosts without a metrics port |

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::api::{
    AdminErrorKind, AuditAnswer, ErrorAnswer, ExplainAnswer, ExplainRequest, LeasesAnswer,
    ReloadAnswer, ReportAnswer, RevokeAnswer, RevokeRequest, StatusAnswer, TlsReload,
};
use crate::service::Service;

pub use crate::api::AdminError;

/// The HTTP status of a failed request: the domain's kinds of failure mapped here, where HTTP
/// is spoken.
fn status_of(kind: AdminErrorKind) -> StatusCode {
    match kind {
        AdminErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        AdminErrorKind::NotFound => StatusCode::NOT_FOUND,
        AdminErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        AdminErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        AdminErrorKind::Conflict => StatusCode::CONFLICT,
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (
            status_of(self.kind),
            Json(ErrorAnswer {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type AdminResult<T> = Result<Json<T>, AdminError>;

/// Binds the admin socket, readable and writable by root only, and serves it until the task
/// is dropped.
pub async fn serve(path: &Path, service: Arc<Service>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a gateway that died: nothing listens on it any more.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = bind_private(path)?;
    axum::serve(listener, router(service)).await
}

/// Binds `path` with mode 0600 from its first moment: bound in a fresh directory only root can
/// enter, given its mode there, then renamed into place. Binding in place and changing the mode
/// afterwards would leave a moment in which a permissive umask lets anyone connect.
fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .unwrap_or(std::ffi::OsStr::new("gateway.sock"));
    let private = dir.join(format!(
        ".{}.{}.{:x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&private)?;
    let staged = private.join(file_name);
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// The routes, for serving and for tests.
pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/leases", get(leases))
        .route("/v1/leases/{id}/revoke", post(revoke))
        .route("/v1/audit", get(audit))
        .route("/v1/policy/reload", post(reload))
        .route("/v1/policy/explain", post(explain))
        .route("/v1/report", get(report))
        .route("/metrics", get(metrics))
        .with_state(service)
}

async fn status(State(service): State<Arc<Service>>) -> AdminResult<StatusAnswer> {
    let mut answer = service.status();
    if let Some(cluster) = service.cluster() {
        answer.cluster = Some(cluster.status().await);
    }
    Ok(Json(answer))
}

async fn leases(
    State(service): State<Arc<Service>>,
    Query(query): Query<HashMap<String, String>>,
) -> AdminResult<LeasesAnswer> {
    service.leases(&query).await.map(Json)
}

async fn revoke(
    State(service): State<Arc<Service>>,
    UrlPath(id): UrlPath<String>,
    body: Option<Json<RevokeRequest>>,
) -> AdminResult<RevokeAnswer> {
    let lease = id
        .parse()
        .map_err(|_| AdminError::bad_request(format!("{id:?} is not a lease id")))?;
    let reason = body.and_then(|Json(body)| body.reason);
    service.revoke_by_operator(lease, reason).await.map(Json)
}

async fn audit(
    State(service): State<Arc<Service>>,
    Query(query): Query<HashMap<String, String>>,
) -> AdminResult<AuditAnswer> {
    service.audit(&query).await.map(Json)
}

async fn reload(State(service): State<Arc<Service>>) -> AdminResult<ReloadAnswer> {
    // On a task of its own, so that it runs to its end even if the operator's client goes away:
    // stopped between revoking a host's leases and closing its connection, it would leave the
    // connection open.
    let reload = tokio::spawn(async move {
        // The CRL is re-read with the policy, as on SIGHUP.
        let tls = service.reload_tls().await;
        let reloaded = service.reload_policy().await?;
        let (tls, closed_connections) = match tls {
            Ok(closed) => (TlsReload::reloaded(), Some(closed)),
            Err(e) => (
                TlsReload::Failed {
                    error: e.to_string(),
                },
                None,
            ),
        };
        Ok(Json(ReloadAnswer {
            reloaded,
            tls,
            closed_connections,
        }))
    });
    reload
        .await
        .map_err(|e| AdminError::internal(format!("the reload did not finish: {e}")))?
}

async fn explain(
    State(service): State<Arc<Service>>,
    body: Result<Json<ExplainRequest>, JsonRejection>,
) -> AdminResult<ExplainAnswer> {
    // A body of the wrong shape is the operator's mistake like any other: 400 with the API's
    // error body, not axum's own answer.
    let Json(body) = body.map_err(|e| AdminError::bad_request(e.body_text()))?;
    service.explain(&body).map(Json)
}

async fn report(
    State(service): State<Arc<Service>>,
    Query(query): Query<HashMap<String, String>>,
) -> AdminResult<ReportAnswer> {
    service.report(&query).await.map(Json)
}

async fn metrics(State(service): State<Arc<Service>>) -> String {
    service.render_metrics()
}
