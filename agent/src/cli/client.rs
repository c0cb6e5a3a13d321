//! The admin API client: HTTP/1.1 over the agent's unix socket or TCP.

use std::{io, path::Path};

use http_body_util::{BodyExt, Empty};
use hyper::{
    Method, Request, StatusCode,
    body::{Bytes, Incoming},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
};

/// Failures, each with what to do about it and an exit code scripts can test.
#[derive(Debug, thiserror::Error)]
pub(super) enum ClientError {
    #[error("agent not running at {0}: start it with `ferry agent --config FILE` (or point --admin at it)")]
    NotRunning(String),
    #[error("permission denied on {0}: run as root")]
    PermissionDenied(String),
    #[error("talking to the agent at {0}: {1}")]
    Io(String, io::Error),
    #[error("the agent at {0} answered badly: {1}")]
    Http(String, hyper::Error),
    #[error("{0}")]
    Api(String),
}

impl ClientError {
    pub(super) fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotRunning(_) | ClientError::Io(..) | ClientError::Http(..) => 3,
            ClientError::PermissionDenied(_) => 4,
            ClientError::Api(_) => 5,
        }
    }
}

pub(super) struct AdminClient {
    /// A unix socket path, or host:port.
    target: String,
}

impl AdminClient {
    pub(super) fn new(target: &str) -> AdminClient {
        AdminClient { target: target.to_owned() }
    }

    fn is_tcp(&self) -> bool {
        !self.target.contains('/') && self.target.contains(':')
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.target.clone())
            }
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(self.target.clone()),
            _ => ClientError::Io(self.target.clone(), e),
        }
    }

    /// Sends a request; the response body is read by the caller (it may stream).
    pub(super) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, "ferry-agent")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Api(format!("bad request {path_and_query}: {e}")))?;
        if self.is_tcp() {
            let stream = TcpStream::connect(&self.target).await.map_err(|e| self.connect_error(e))?;
            self.exchange(stream, request).await
        } else {
            let stream =
                UnixStream::connect(Path::new(&self.target)).await.map_err(|e| self.connect_error(e))?;
            self.exchange(stream, request).await
        }
    }

    async fn exchange<S>(
        &self,
        stream: S,
        request: Request<Empty<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http = |e| ClientError::Http(self.target.clone(), e);
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let body = response.into_body().collect().await.map_err(http)?.to_bytes();
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api(format!("the agent refused ({status}): {message}")));
        }
        Ok(response)
    }

    /// GET, whole body.
    pub(super) async fn get(&self, path_and_query: &str) -> Result<Bytes, ClientError> {
        let response = self.send(Method::GET, path_and_query).await?;
        Ok(response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(self.target.clone(), e))?
            .to_bytes())
    }

    /// GET a JSON document.
    pub(super) async fn get_json(&self, path_and_query: &str) -> Result<serde_json::Value, ClientError> {
        let body = self.get(path_and_query).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Api(format!("bad JSON from the agent: {e}")))
    }
}
