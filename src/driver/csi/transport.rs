//! How the driver reaches the plugin: one fresh connection per call, each call within the
//! configured deadline, and the classification of a call that did not succeed.

use crate::driver::DriverError;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// How a call ended when it did not succeed: a gRPC status from the plugin (or from the transport
/// after sending), or a failure already classified (nothing sent, or the deadline passed).
pub(super) enum Failure {
    Status(Status),
    Driver(DriverError),
}

/// The plugin's socket and the deadline of each call made on it.
#[derive(Clone, Debug)]
pub(super) struct Transport {
    pub(super) socket: PathBuf,
    pub(super) call_timeout: Duration,
}

impl Transport {
    /// Opens a connection, makes one call on it within the deadline (sent to the plugin as the
    /// request's gRPC timeout), and closes it.
    pub(super) async fn call<M, T, F, Fut>(
        &self,
        operation: &'static str,
        message: M,
        make_call: F,
    ) -> Result<T, Failure>
    where
        F: FnOnce(Channel, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let deadline = self.call_timeout;
        let channel = tokio::time::timeout(deadline, connect(&self.socket))
            .await
            .map_err(|_| {
                Failure::Driver(DriverError::Unreachable(format!(
                    "no connection to CSI plugin at {} within {deadline:?}",
                    self.socket.display()
                )))
            })?
            .map_err(Failure::Driver)?;
        // The plugin is told what is left of the deadline, so that it gives up when the caller
        // does: a call is never carried out on the plugin's own clock past the caller's.
        let remaining = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, make_call(channel, deadlined(message, remaining)))
            .await
        {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // The client gives up at the gRPC timeout it sent, with CANCELLED.
            Ok(Err(status))
                if status.code() == Code::Cancelled && started.elapsed() >= deadline =>
            {
                Err(Failure::Driver(DriverError::Timeout {
                    operation,
                    deadline,
                }))
            }
            Ok(Err(status)) => Err(Failure::Status(status)),
            Err(_) => Err(Failure::Driver(DriverError::Timeout {
                operation,
                deadline,
            })),
        }
    }

    /// The classification every call shares; callers handle their own `NOT_FOUND` and
    /// `FAILED_PRECONDITION` first.
    pub(super) fn classify(&self, operation: &'static str, failure: Failure) -> DriverError {
        let status = match failure {
            Failure::Driver(error) => return error,
            Failure::Status(status) => status,
        };
        let message = describe(&status);
        // A status with a source was made here from a transport failure (the connection broke
        // after the request went out), not sent by the plugin: its reply is lost.
        if let Some(source) = std::error::Error::source(&status) {
            return DriverError::LostReply {
                operation,
                message: format!("{message} ({})", error_chain(source)),
            };
        }
        match status.code() {
            Code::DeadlineExceeded => DriverError::Timeout {
                operation,
                deadline: self.call_timeout,
            },
            Code::Cancelled | Code::Unavailable | Code::Aborted | Code::ResourceExhausted => {
                DriverError::LostReply { operation, message }
            }
            Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented => {
                DriverError::Invalid(format!("{operation}: {message}"))
            }
            _ => DriverError::Refused(format!("{operation}: {message}")),
        }
    }
}

/// A request carrying the call's deadline as its gRPC timeout.
fn deadlined<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// An error and its causes, `: `-separated.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

/// `CODE: message`, for error messages.
pub(super) fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// A fresh HTTP/2 connection over the plugin's socket. A failure here happened before any request
/// was sent.
async fn connect(socket: &Path) -> Result<Channel, DriverError> {
    let stream = UnixStream::connect(socket).await.map_err(|error| {
        DriverError::Unreachable(format!("CSI plugin socket {}: {error}", socket.display()))
    })?;
    let stream = Arc::new(Mutex::new(Some(stream)));
    // The URI is required by the HTTP/2 layer and otherwise unused: the stream is the socket.
    Endpoint::from_static("http://csi.plugin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let stream = stream.lock().ok().and_then(|mut slot| slot.take());
            async move {
                stream.map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the connection to the CSI plugin was closed",
                    )
                })
            }
        }))
        .await
        .map_err(|error| {
            DriverError::Unreachable(format!(
                "CSI plugin socket {}: HTTP/2 handshake: {error}",
                socket.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport() -> Transport {
        Transport {
            socket: PathBuf::from("/nonexistent"),
            call_timeout: Duration::from_secs(3),
        }
    }

    #[test]
    fn status_codes_map_to_classes() {
        use crate::driver::ErrorClass::*;
        let transport = transport();
        let class = |code| {
            transport
                .classify("op", Failure::Status(Status::new(code, "m")))
                .class()
        };
        for code in [
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unavailable,
            Code::Aborted,
            Code::ResourceExhausted,
        ] {
            assert_eq!(class(code), UnknownOutcome, "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::OutOfRange, Code::Unimplemented] {
            assert_eq!(class(code), Final, "{code:?}");
        }
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Unauthenticated,
        ] {
            assert_eq!(class(code), Retryable, "{code:?}");
        }
        assert!(matches!(
            transport.classify("op", Failure::Status(Status::deadline_exceeded("late"))),
            DriverError::Timeout {
                operation: "op",
                deadline,
            } if deadline == Duration::from_secs(3)
        ));
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable() {
        let result: Result<(), Failure> = transport()
            .call("op", (), |_, _| async { Ok(tonic::Response::new(())) })
            .await;
        assert!(matches!(
            result,
            Err(Failure::Driver(DriverError::Unreachable(_)))
        ));
    }
}
