//! Response bodies: a whole JSON body, or the metered SSE relay that forwards each
//! complete event as it arrives and emits the call record when the stream ends or is
//! dropped (client gone, engine stopping).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::{error_event, ApiError};
use crate::proxy::RequestLog;
use crate::sse::SseRelay;

/// Every response the gateway sends.
pub(crate) enum RespBody {
    Full(Option<Bytes>),
    Stream(Box<StreamBody>),
}

impl From<Bytes> for RespBody {
    fn from(b: Bytes) -> Self {
        RespBody::Full(Some(b))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Stream(s) => s.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, RespBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Stream(_) => SizeHint::default(),
        }
    }
}

enum State {
    Relaying,
    /// Upstream finished (cleanly when `None`); send what is queued, then the record.
    Ending(Option<ApiError>),
    Ended,
}

/// The metered SSE relay of one streamed call.
pub(crate) struct StreamBody {
    upstream: Incoming,
    relay: SseRelay,
    ready: VecDeque<Bytes>,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    state: State,
    // Declared last so the upstream body is dropped (cancelling the upstream request)
    // before the record is emitted.
    log: RequestLog,
}

impl StreamBody {
    pub(crate) fn new(
        upstream: Incoming,
        relay: SseRelay,
        idle: Duration,
        log: RequestLog,
    ) -> Self {
        StreamBody {
            upstream,
            relay,
            ready: VecDeque::with_capacity(4),
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            state: State::Relaying,
            log,
        }
    }

    fn sync_meter(&mut self) {
        self.log.relayed_tokens = self.relay.meter.output_tokens;
        if self.relay.meter.usage.is_some() {
            self.log.upstream_usage = self.relay.meter.usage;
        }
    }

    fn end_with(&mut self, err: Option<ApiError>) {
        if let Some(err) = err {
            self.ready.push_back(error_event(err));
        }
        self.sync_meter();
        self.state = State::Ending(err);
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(event))));
            }
            match self.state {
                State::Ended => return Poll::Ready(None),
                State::Ending(err) => {
                    self.state = State::Ended;
                    self.log.finish(200, err);
                    return Poll::Ready(None);
                }
                State::Relaying => {}
            }
            match Pin::new(&mut self.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.relay.push(&data, &mut self.ready);
                        self.sync_meter();
                        let deadline = Instant::now() + self.idle;
                        self.idle_timer.as_mut().reset(deadline);
                    }
                }
                Poll::Ready(Some(Err(_))) => self.end_with(Some(ApiError::UpstreamStreamCut)),
                Poll::Ready(None) => {
                    self.relay.finish(&mut self.ready);
                    let err = (!self.relay.meter.done).then_some(ApiError::UpstreamStreamCut);
                    self.end_with(err);
                }
                Poll::Pending => {
                    if self.idle_timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.end_with(Some(ApiError::UpstreamTimeout));
                }
            }
        }
    }
}
