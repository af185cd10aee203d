//! The client side of the admin API (see [`crate::admin`]): one HTTP/1.1 request per call over
//! the gateway's Unix socket, JSON in and out. `fwnpctl` is built on it.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The default admin socket of the gateway.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/fwnp/gateway.sock";

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminClientError {
    /// The socket could not be reached: the gateway does not run, or the caller is not root.
    #[error(
        "cannot reach the gateway's admin socket {path}: {source} (is fwnp-gateway running, and are you root?)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failed on an open connection.
    #[error("admin API: {0}")]
    Http(String),
    /// The gateway refused the request; `message` says why.
    #[error("{message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The gateway's explanation.
        message: String,
    },
    /// The answer was not JSON.
    #[error("admin API answered something that is not JSON: {0}")]
    NotJson(String),
    /// The answer was JSON, but not the answer the request has (a gateway of another version).
    #[error("admin API answered {path} with an unexpected shape: {reason}")]
    Unexpected {
        /// The request's path.
        path: String,
        /// What did not fit.
        reason: String,
    },
}

impl AdminClientError {
    /// Whether the gateway said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AdminClientError::Refused { status: 404, .. })
    }
}

/// A client of one gateway's admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    /// A client for the socket at `socket`; nothing is connected until a call.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        AdminClient {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// `GET path` (with its query string).
    pub async fn get(&self, path_and_query: &str) -> Result<Value, AdminClientError> {
        self.call(Method::GET, path_and_query, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, AdminClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// The typed answer of `answer`, which came from `path`.
    ///
    /// ```
    /// use fwnp_gateway::admin_client::AdminClient;
    /// use fwnp_gateway::api::RevokeAnswer;
    /// let answer = serde_json::json!({ "revoked": "00ff", "host": "fwnp://host/web-01" });
    /// let typed: RevokeAnswer = AdminClient::typed("/v1/leases/00ff/revoke", &answer).unwrap();
    /// assert_eq!(typed.revoked, "00ff");
    /// ```
    pub fn typed<T: serde::de::DeserializeOwned>(
        path: &str,
        answer: &Value,
    ) -> Result<T, AdminClientError> {
        T::deserialize(answer).map_err(|e| AdminClientError::Unexpected {
            path: path.split('?').next().unwrap_or(path).to_owned(),
            reason: e.to_string(),
        })
    }

    /// The JSON body of a typed request.
    pub fn body<T: serde::Serialize>(body: &T) -> Result<Value, AdminClientError> {
        serde_json::to_value(body).map_err(|e| AdminClientError::Http(e.to_string()))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, AdminClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| AdminClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AdminClientError::Http(e.to_string()))?;
        tokio::spawn(connection);
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "fwnp")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .map_err(|e| AdminClientError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| AdminClientError::Http(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| AdminClientError::Http(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body).map_err(|_| {
            AdminClientError::NotJson(String::from_utf8_lossy(&body).chars().take(200).collect())
        })?;
        if status != StatusCode::OK {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_owned);
            return Err(AdminClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(value)
    }
}
