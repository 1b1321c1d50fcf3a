//! Per-connection time limits: a connection must deliver its first request head within
//! the header timeout (which also bounds the TLS handshake and the HTTP/1-or-2 sniff),
//! and one with no request in progress and no bytes either way for the idle timeout is
//! closed. Both end the connection by reporting end-of-file to hyper, which then closes
//! it as if the client had gone.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the connection's requests are doing, shared by its I/O and its service.
pub(crate) struct Activity {
    origin: Instant,
    /// Responses begun and not yet ended (or dropped).
    pending: AtomicUsize,
    /// A request head has arrived.
    started: AtomicBool,
    /// Milliseconds after `origin` of the last byte read or written.
    last_io_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            origin: Instant::now(),
            pending: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            last_io_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    /// A request has arrived; the returned guard is its response's lifetime.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// When the connection should be closed for doing nothing, if it is idle at all.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.pending.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if !self.started.load(Ordering::Relaxed) {
            return Some(self.origin + limits.first_request);
        }
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        Some(self.origin + last + limits.idle)
    }
}

/// A request in progress on its connection, until its response body ends.
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle period starts when the response is done, not when it began.
        self.0.touch();
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection time limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) first_request: Duration,
    pub(crate) idle: Duration,
}

/// The connection's byte stream, with the time limits applied.
pub(crate) struct TimedIo<I> {
    inner: I,
    activity: Arc<Activity>,
    limits: Limits,
    timer: Pin<Box<Sleep>>,
    /// Called once when a time limit closes the connection.
    on_expire: Option<Box<dyn FnOnce() + Send>>,
}

impl<I> TimedIo<I> {
    pub(crate) fn new(
        inner: I,
        activity: Arc<Activity>,
        limits: Limits,
        on_expire: Box<dyn FnOnce() + Send>,
    ) -> Self {
        let first = activity.origin + limits.first_request;
        TimedIo {
            inner,
            activity,
            limits,
            timer: Box::pin(tokio::time::sleep_until(first)),
            on_expire: Some(on_expire),
        }
    }

    /// Whether a time limit has passed. Registers the timer otherwise. The timer is only
    /// moved later when it fires (the idle deadline only moves later with traffic), and
    /// earlier once, when the first request ends and the idle limit is the shorter one;
    /// so ordinary traffic does not touch the timer wheel.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let deadline = self.activity.deadline(&self.limits);
            if let Some(d) = deadline {
                if d < self.timer.deadline() {
                    self.timer.as_mut().reset(d);
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let Some(deadline) = deadline else {
                // A request is in progress; its end touches the activity, and hyper
                // reads again after writing the response, which re-arms the timer.
                return false;
            };
            if Instant::now() >= deadline {
                if let Some(f) = self.on_expire.take() {
                    f();
                }
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TimedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.on_expire.is_none() {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.activity.touch();
                }
                Poll::Ready(r)
            }
            // End-of-file: hyper closes the connection.
            Poll::Pending if this.expired(cx) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in progress until it ends.
pub(crate) struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, in_flight: InFlight) -> Self {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
