//! The client-side bound on the controllers' requests to the Kubernetes API: a token bucket
//! (`kubeApiQps`, `kubeApiBurst`) in front of the client, so that a storm of thousands of
//! attachments takes no more of a small apiserver than it was given. Each request waits for its
//! token before it is sent; a watch takes one when it starts, none for what it streams.
//!
//! The leader election's client has no such bound: a lease renewal queued behind a storm's
//! writes could outlast the lease, and hand the volumes to a second replica for nothing.

use crate::config::ApiRate;
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kube::client::ClientBuilder;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// A Kubernetes client whose requests keep to `rate`, or an unbounded one for `None`.
pub async fn client(rate: Option<ApiRate>) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let builder = ClientBuilder::try_from(config)?;
    Ok(match rate {
        Some(rate) => builder.with_layer(&RateLimitLayer::new(rate)).build(),
        None => builder.build(),
    })
}

/// Wraps a service so that each request waits for a token of one shared bucket.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl RateLimitLayer {
    pub fn new(rate: ApiRate) -> Self {
        let quota = Quota::per_second(rate.qps).allow_burst(rate.burst);
        Self {
            limiter: Arc::new(RateLimiter::direct(quota)),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited {
            inner,
            limiter: self.limiter.clone(),
            waiting: None,
            admitted: false,
        }
    }
}

/// A service that is ready only once the next request has its token. The client's buffer asks
/// one request at a time, so the requests go out in the order they came, at the bucket's rate.
pub struct RateLimited<S> {
    inner: S,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The wait for the next request's token, while it lasts.
    waiting: Option<BoxFuture<'static, ()>>,
    /// The next request has its token.
    admitted: bool,
}

impl<S, Request> Service<Request> for RateLimited<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.admitted {
            let waiting = self.waiting.get_or_insert_with(|| {
                let limiter = self.limiter.clone();
                Box::pin(async move { limiter.until_ready().await })
            });
            if waiting.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.waiting = None;
            self.admitted = true;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.admitted = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::{Duration, Instant};
    use tower::ServiceExt;

    #[tokio::test]
    async fn requests_past_the_burst_go_out_at_the_rate() {
        let rate = ApiRate {
            qps: NonZeroU32::new(20).unwrap(),
            burst: NonZeroU32::new(5).unwrap(),
        };
        let mut service = RateLimitLayer::new(rate)
            .layer(tower::service_fn(|n: u32| async move { Ok::<_, ()>(n) }));
        let start = Instant::now();
        let mut sent_at = Vec::new();
        for n in 0..15 {
            let answer = service.ready().await.unwrap().call(n).await.unwrap();
            assert_eq!(answer, n);
            sent_at.push(start.elapsed());
        }
        // The burst of 5 at once, then one every 50 ms: the 15th no sooner than 10 × 50 ms.
        assert!(sent_at[14] >= Duration::from_millis(480), "{sent_at:?}");
    }
}
