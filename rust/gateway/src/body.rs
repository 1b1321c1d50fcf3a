//! Response bodies: a whole body, or the metered SSE relay that forwards each complete
//! event as it arrives. A proxied request's body carries its [`Call`] and settles and
//! records it when the body ends or is dropped (client gone, engine stopping), so the
//! record is never written between the response and the client.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::call::Call;
use crate::error::ApiError;
use crate::phase::{Mark, Phase};
use crate::protocol::StreamRelay;
use crate::routing::Permit;

/// Every response the gateway sends.
pub(crate) enum RespBody {
    /// A whole body that no call record belongs to (`/healthz`, `/metrics`).
    Full(Option<Bytes>),
    /// A whole body of a proxied request.
    Recorded(Box<RecordedBody>),
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
            RespBody::Recorded(r) => Poll::Ready(match r.body.take() {
                Some(b) => Some(Ok(Frame::data(b))),
                None => {
                    r.end();
                    None
                }
            }),
            RespBody::Stream(s) => {
                // The relay phase, poll by poll; settle and record, when this poll ends
                // the stream, count themselves.
                let from = Mark::now(s.call.shared.config.phase_timing);
                s.call.closing_cpu_ns = 0;
                let out = s.poll_next(cx);
                let call = &s.call;
                let cpu = &call.shared.metrics.phase_cpu;
                cpu.charge(Phase::Relay, from, call.closing_cpu_ns);
                out
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Recorded(r) => r.body.is_none(),
            RespBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let whole =
            |b: &Option<Bytes>| SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64));
        match self {
            RespBody::Full(b) => whole(b),
            RespBody::Recorded(r) => whole(&r.body),
            RespBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// A whole response body and the record of its request, emitted once the body has been
/// handed to the connection, or when it is dropped unsent: exactly once either way, with
/// the status and error the response carries.
pub(crate) struct RecordedBody {
    body: Option<Bytes>,
    status: u16,
    err: Option<ApiError>,
    call: Call,
}

impl RecordedBody {
    pub(crate) fn new(body: Option<Bytes>, status: u16, err: Option<ApiError>, call: Call) -> Self {
        RecordedBody {
            body,
            status,
            err,
            call,
        }
    }

    fn end(&mut self) {
        // `finish` runs once; a second call (end, then drop) does nothing.
        self.call.finish(self.status, self.err);
    }
}

impl Drop for RecordedBody {
    fn drop(&mut self) {
        self.end();
    }
}

enum State {
    Relaying,
    /// Upstream finished (cleanly when `None`); send what is queued, then the record.
    Ending(Option<ApiError>),
    Ended,
}

/// Bounds on a streamed upstream response.
pub(crate) struct StreamLimits {
    /// Longest gap between upstream bytes.
    pub(crate) idle: Duration,
    /// When the whole response must have arrived: a trickle that keeps resetting the idle
    /// timer still ends here.
    pub(crate) deadline: Instant,
    /// Longest single SSE event; the framer holds at most this much (plus one chunk).
    pub(crate) max_event_bytes: usize,
}

/// The metered SSE relay of one streamed call.
pub(crate) struct StreamBody {
    upstream: Incoming,
    relay: StreamRelay,
    ready: VecDeque<Bytes>,
    limits: StreamLimits,
    idle_timer: Pin<Box<Sleep>>,
    deadline_timer: Pin<Box<Sleep>>,
    state: State,
    /// The provider's concurrency slot, held until the stream ends.
    _permit: Option<Permit>,
    // Declared last so the upstream body is dropped (cancelling the upstream request)
    // before the record is emitted.
    call: Call,
}

impl StreamBody {
    pub(crate) fn new(
        upstream: Incoming,
        relay: StreamRelay,
        limits: StreamLimits,
        permit: Option<Permit>,
        call: Call,
    ) -> Self {
        StreamBody {
            upstream,
            relay,
            ready: VecDeque::with_capacity(4),
            idle_timer: Box::pin(tokio::time::sleep(limits.idle)),
            deadline_timer: Box::pin(tokio::time::sleep_until(limits.deadline)),
            limits,
            state: State::Relaying,
            _permit: permit,
            call,
        }
    }

    fn sync_meter(&mut self) {
        let meter = self.relay.meter();
        self.call.relayed_tokens = meter.output_tokens;
        if meter.usage.is_some() {
            self.call.upstream_usage = meter.usage;
        }
    }

    fn end_with(&mut self, err: Option<ApiError>) {
        if let Some(event) = err.and_then(|e| self.relay.error_event(e)) {
            self.ready.push_back(event);
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
                if self.ready.is_empty() {
                    if let State::Ending(err) = self.state {
                        // The last event is about to be handed to the connection: journal
                        // the record first, so a client that saw the stream complete (its
                        // `[DONE]`) never outlives the record of it in a crash.
                        self.state = State::Ended;
                        self.call.finish(200, err);
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(event))));
            }
            match self.state {
                State::Ended => return Poll::Ready(None),
                State::Ending(err) => {
                    self.state = State::Ended;
                    self.call.finish(200, err);
                    return Poll::Ready(None);
                }
                State::Relaying => {}
            }
            match Pin::new(&mut self.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.relay.push(&data, &mut self.ready);
                        if self.relay.pending() > self.limits.max_event_bytes {
                            // An event this long is no chat delta: stop holding it. What
                            // was relayed before stays chargeable.
                            self.relay.discard();
                            self.end_with(Some(ApiError::UpstreamTooLarge));
                            continue;
                        }
                        if self.relay.meter().done {
                            // The terminal event is in: end here rather than when the
                            // upstream closes its body, so the record is journaled before
                            // that event reaches the client. One more poll lets a body
                            // whose end is already buffered say so, so its connection
                            // goes back to the pool; anything after the event is ignored.
                            if !self.upstream.is_end_stream() {
                                let _ = Pin::new(&mut self.upstream).poll_frame(cx);
                            }
                            self.relay.finish(&mut self.ready);
                            self.end_with(None);
                            continue;
                        }
                        self.sync_meter();
                        let now = Instant::now();
                        if now >= self.limits.deadline {
                            // An upstream that always has bytes ready never lets the
                            // deadline timer below be polled.
                            self.end_with(Some(ApiError::UpstreamTimeout));
                            continue;
                        }
                        self.idle_timer.as_mut().reset(now + self.limits.idle);
                    }
                }
                Poll::Ready(Some(Err(_))) => self.end_with(Some(ApiError::UpstreamStreamCut)),
                Poll::Ready(None) => {
                    self.relay.finish(&mut self.ready);
                    let err = (!self.relay.meter().done).then_some(ApiError::UpstreamStreamCut);
                    self.end_with(err);
                }
                Poll::Pending => {
                    if self.idle_timer.as_mut().poll(cx).is_pending()
                        && self.deadline_timer.as_mut().poll(cx).is_pending()
                    {
                        return Poll::Pending;
                    }
                    self.end_with(Some(ApiError::UpstreamTimeout));
                }
            }
        }
    }
}

/// Read a whole upstream body: each frame within the idle timeout, all of it by the
/// deadline, at most `max` bytes. A declared length over `max` is refused before reading;
/// otherwise every byte is copied once, into a buffer sized by the declared length.
pub(crate) async fn collect(
    mut body: Incoming,
    idle: Duration,
    deadline: Instant,
    max: usize,
) -> Result<Bytes, ApiError> {
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::UpstreamTooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut buf = bytes::BytesMut::new();
    loop {
        let next = tokio::time::timeout_at(deadline.min(Instant::now() + idle), body.frame());
        let frame = match next.await {
            Err(_) => return Err(ApiError::UpstreamTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ApiError::UpstreamError),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // The common case is a single frame, kept without a copy.
        if first.is_none() && buf.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                let cap = declared.map_or(0, |n| usize::try_from(n).unwrap_or(max));
                buf.reserve(cap.max(f.len() + data.len()));
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&data);
        }
        if first.as_ref().map_or(buf.len(), Bytes::len) > max {
            return Err(ApiError::UpstreamTooLarge);
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}
