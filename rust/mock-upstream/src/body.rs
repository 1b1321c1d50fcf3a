//! The response body: either one buffer, or a queue of frames released one by one (with an
//! optional pause before each chunk) that may end in a deliberate connection cut.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// Pause between the last frame before a cut and the cut itself.
const CUT_SETTLE: Duration = Duration::from_millis(2);

/// The error a body returns to make hyper abort the connection (HTTP/1.1) or reset the
/// stream (h2) mid-body: what a vendor that dies mid-stream looks like to its client.
#[derive(Debug)]
pub struct ConnectionCut;

impl fmt::Display for ConnectionCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock upstream cut the connection (cut_after)")
    }
}

impl std::error::Error for ConnectionCut {}

/// One piece of a framed body. `paced` pieces wait `delay` before they are released.
pub(crate) struct Piece {
    pub(crate) bytes: Bytes,
    pub(crate) paced: bool,
}

/// Response body of the mock. A timer state machine instead of a task and a channel per
/// stream: nothing is spawned, and an unpaced frame is handed to hyper as soon as it asks.
pub enum MockBody {
    /// A complete reply; the exact size hint lets hyper write `content-length`.
    Full(Option<Bytes>),
    /// Frames written one by one (SSE events, or a truncated reply before a cut).
    Framed(Box<Framed>),
}

/// State of a [`MockBody::Framed`] body.
pub struct Framed {
    pieces: VecDeque<Piece>,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    cut_at_end: bool,
}

impl MockBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(bytes.into()))
    }

    pub(crate) fn framed(pieces: VecDeque<Piece>, delay: Duration, cut_at_end: bool) -> Self {
        MockBody::Framed(Box::new(Framed {
            pieces,
            delay,
            sleep: None,
            cut_at_end,
        }))
    }
}

impl Framed {
    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnectionCut>>> {
        let Some(front) = self.pieces.front() else {
            if self.cut_at_end {
                // hyper discards what it has not flushed when a body fails (and h2 drops a
                // reset stream's queued frames), so give the last frames a moment to reach
                // the socket before failing: the client must see every chunk before the cut.
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(CUT_SETTLE)));
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
                // Once: after the error hyper drops the connection and never polls again.
                self.cut_at_end = false;
                return Poll::Ready(Some(Err(ConnectionCut)));
            }
            return Poll::Ready(None);
        };
        if front.paced && !self.delay.is_zero() {
            let delay = self.delay;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        Poll::Ready(self.pieces.pop_front().map(|p| Ok(Frame::data(p.bytes))))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = ConnectionCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Framed(framed) => framed.poll_piece(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Framed(framed) => framed.pieces.is_empty() && !framed.cut_at_end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Framed(_) => SizeHint::default(),
        }
    }
}
