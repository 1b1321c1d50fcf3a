//! The engine's API errors (to the embedding program) and the hot path's errors (to the
//! HTTP client). Both carry fixed texts only: never any part of a request or response body.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::limits::Refusal;
use crate::policy::Denial;
use crate::protocol::validate::Invalid;

/// Errors returned by the [`crate::Engine`] API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration or snapshot JSON was rejected.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listener could not bind its address.
    #[error("cannot bind: {0}")]
    Bind(String),
    /// The TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The call does not fit the engine's state.
    #[error("engine state: {0}")]
    State(String),
}

/// Every way a request can fail, as seen by the client. The discriminant indexes the
/// per-code error counters, so the metric label set is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiError {
    InvalidApiKey,
    KeyRevoked,
    KeyExpired,
    OrgDisabled,
    ModelNotAllowed,
    NotFound,
    ModelNotFound,
    MethodNotAllowed,
    InvalidJson,
    InvalidRequest,
    BodyTooLarge,
    InsufficientBalance,
    IpBlocked,
    KeyIpNotAllowed,
    KeyNotYetValid,
    RateLimited,
    ConcurrencyLimited,
    BudgetExceeded,
    SensitiveContentBlocked,
    PolicyDenied,
    UpstreamBusy,
    UpstreamError,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamStreamCut,
    UpstreamAddressRefused,
    UpstreamTooLarge,
    HeadersTooLarge,
    ClientDisconnected,
    ShuttingDown,
    Internal,
    LoopDetected,
    SharedStateUnavailable,
    WrongGatewayPool,
}

impl ApiError {
    pub(crate) const ALL: [ApiError; 34] = [
        ApiError::InvalidApiKey,
        ApiError::KeyRevoked,
        ApiError::KeyExpired,
        ApiError::OrgDisabled,
        ApiError::ModelNotAllowed,
        ApiError::NotFound,
        ApiError::ModelNotFound,
        ApiError::MethodNotAllowed,
        ApiError::InvalidJson,
        ApiError::InvalidRequest,
        ApiError::BodyTooLarge,
        ApiError::InsufficientBalance,
        ApiError::IpBlocked,
        ApiError::KeyIpNotAllowed,
        ApiError::KeyNotYetValid,
        ApiError::RateLimited,
        ApiError::ConcurrencyLimited,
        ApiError::BudgetExceeded,
        ApiError::SensitiveContentBlocked,
        ApiError::PolicyDenied,
        ApiError::UpstreamBusy,
        ApiError::UpstreamError,
        ApiError::UpstreamUnreachable,
        ApiError::UpstreamTimeout,
        ApiError::UpstreamStreamCut,
        ApiError::UpstreamAddressRefused,
        ApiError::UpstreamTooLarge,
        ApiError::HeadersTooLarge,
        ApiError::ClientDisconnected,
        ApiError::ShuttingDown,
        ApiError::Internal,
        ApiError::LoopDetected,
        ApiError::SharedStateUnavailable,
        ApiError::WrongGatewayPool,
    ];

    /// Low-cardinality code used in the error body, the record and the metric label.
    pub(crate) fn code(self) -> &'static str {
        match self {
            ApiError::InvalidApiKey => "invalid_api_key",
            ApiError::KeyRevoked => "key_revoked",
            ApiError::KeyExpired => "key_expired",
            ApiError::OrgDisabled => "org_disabled",
            ApiError::ModelNotAllowed => "model_not_allowed",
            ApiError::NotFound => "not_found",
            ApiError::ModelNotFound => "model_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InvalidJson => "invalid_json",
            ApiError::InvalidRequest => "invalid_request",
            ApiError::BodyTooLarge => "body_too_large",
            ApiError::InsufficientBalance => "insufficient_balance",
            ApiError::IpBlocked => "ip_blocked",
            ApiError::KeyIpNotAllowed => "key_ip_not_allowed",
            ApiError::KeyNotYetValid => "key_not_yet_valid",
            ApiError::RateLimited => "rate_limited",
            ApiError::ConcurrencyLimited => "concurrency_limited",
            ApiError::BudgetExceeded => "budget_exceeded",
            ApiError::SensitiveContentBlocked => "sensitive_content_blocked",
            ApiError::PolicyDenied => "policy_denied",
            ApiError::UpstreamBusy => "upstream_busy",
            ApiError::UpstreamError => "upstream_error",
            ApiError::UpstreamUnreachable => "upstream_unreachable",
            ApiError::UpstreamTimeout => "upstream_timeout",
            ApiError::UpstreamStreamCut => "upstream_stream_cut",
            ApiError::UpstreamAddressRefused => "upstream_address_refused",
            ApiError::UpstreamTooLarge => "upstream_response_too_large",
            ApiError::HeadersTooLarge => "headers_too_large",
            ApiError::ClientDisconnected => "client_disconnected",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal => "internal_error",
            ApiError::LoopDetected => "loop_detected",
            ApiError::SharedStateUnavailable => "shared_state_unavailable",
            ApiError::WrongGatewayPool => "wrong_gateway_pool",
        }
    }

    pub(crate) fn status(self) -> StatusCode {
        match self {
            ApiError::InvalidApiKey | ApiError::KeyRevoked | ApiError::KeyExpired => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::OrgDisabled | ApiError::ModelNotAllowed => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::ModelNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InvalidJson | ApiError::InvalidRequest => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InsufficientBalance => StatusCode::PAYMENT_REQUIRED,
            ApiError::IpBlocked | ApiError::KeyIpNotAllowed => StatusCode::FORBIDDEN,
            ApiError::KeyNotYetValid => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited | ApiError::ConcurrencyLimited | ApiError::BudgetExceeded => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::SensitiveContentBlocked => StatusCode::BAD_REQUEST,
            ApiError::PolicyDenied => StatusCode::FORBIDDEN,
            ApiError::UpstreamBusy => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UpstreamError | ApiError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::UpstreamStreamCut
            | ApiError::UpstreamAddressRefused
            | ApiError::UpstreamTooLarge => StatusCode::BAD_GATEWAY,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::ClientDisconnected => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::LoopDetected => StatusCode::LOOP_DETECTED,
            ApiError::SharedStateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::WrongGatewayPool => StatusCode::FORBIDDEN,
        }
    }

    /// OpenAI's `error.type` family for the code.
    fn kind(self) -> &'static str {
        match self {
            ApiError::InvalidApiKey | ApiError::KeyRevoked | ApiError::KeyExpired => {
                "authentication_error"
            }
            ApiError::OrgDisabled | ApiError::ModelNotAllowed => "permission_error",
            ApiError::NotFound | ApiError::ModelNotFound => "not_found_error",
            ApiError::MethodNotAllowed | ApiError::InvalidJson | ApiError::InvalidRequest => {
                "invalid_request_error"
            }
            ApiError::BodyTooLarge => "invalid_request_error",
            ApiError::InsufficientBalance => "insufficient_quota",
            ApiError::IpBlocked | ApiError::KeyIpNotAllowed => "permission_error",
            ApiError::KeyNotYetValid => "authentication_error",
            ApiError::RateLimited | ApiError::ConcurrencyLimited | ApiError::BudgetExceeded => {
                "rate_limit_error"
            }
            ApiError::SensitiveContentBlocked => "invalid_request_error",
            ApiError::PolicyDenied => "permission_error",
            ApiError::UpstreamBusy => "rate_limit_error",
            ApiError::UpstreamError
            | ApiError::UpstreamUnreachable
            | ApiError::UpstreamTimeout
            | ApiError::UpstreamStreamCut
            | ApiError::UpstreamAddressRefused
            | ApiError::UpstreamTooLarge => "upstream_error",
            ApiError::HeadersTooLarge => "invalid_request_error",
            ApiError::ClientDisconnected => "client_error",
            ApiError::ShuttingDown => "service_unavailable",
            ApiError::Internal => "server_error",
            ApiError::LoopDetected => "invalid_request_error",
            ApiError::SharedStateUnavailable => "service_unavailable",
            ApiError::WrongGatewayPool => "permission_error",
        }
    }

    /// Fixed message text: written by the gateway, never derived from request data.
    pub(crate) fn message(self) -> &'static str {
        match self {
            ApiError::InvalidApiKey => "Missing or invalid API key.",
            ApiError::KeyRevoked => "This API key has been revoked.",
            ApiError::KeyExpired => "This API key has expired.",
            ApiError::OrgDisabled => "The organization of this API key is not active.",
            ApiError::ModelNotAllowed => "This API key may not use the requested model.",
            ApiError::NotFound => "Unknown endpoint.",
            ApiError::ModelNotFound => "The requested model does not exist for this endpoint.",
            ApiError::MethodNotAllowed => "Method not allowed for this endpoint.",
            ApiError::InvalidJson => "The request body is not valid JSON.",
            ApiError::InvalidRequest => {
                "The request body must be a JSON object with a \"model\" field."
            }
            ApiError::BodyTooLarge => "The request body is too large.",
            ApiError::InsufficientBalance => "Insufficient balance for this request.",
            ApiError::IpBlocked => "Requests from this source address are blocked.",
            ApiError::KeyIpNotAllowed => "This API key may not be used from this source address.",
            ApiError::KeyNotYetValid => "This API key is not valid yet.",
            ApiError::RateLimited => "Rate limit exceeded; retry after the Retry-After delay.",
            ApiError::ConcurrencyLimited => {
                "Too many concurrent requests for this key or organization."
            }
            ApiError::BudgetExceeded => "The spend budget for this period is exhausted.",
            ApiError::SensitiveContentBlocked => {
                "The request was blocked by the organization's sensitive-content policy."
            }
            ApiError::PolicyDenied => "No provider permitted by policy can serve this model.",
            ApiError::UpstreamBusy => "Every permitted provider is at its concurrency limit.",
            ApiError::UpstreamError => "The upstream provider returned an error.",
            ApiError::UpstreamUnreachable => "The upstream provider could not be reached.",
            ApiError::UpstreamTimeout => "The upstream provider timed out.",
            ApiError::UpstreamStreamCut => "The upstream stream ended unexpectedly.",
            ApiError::UpstreamAddressRefused => {
                "The upstream provider's address is not one the gateway may connect to."
            }
            ApiError::UpstreamTooLarge => {
                "The upstream response exceeded the gateway's size limit."
            }
            ApiError::HeadersTooLarge => "The request headers are too large.",
            ApiError::ClientDisconnected => "The client disconnected.",
            ApiError::ShuttingDown => "The gateway is shutting down.",
            ApiError::Internal => "Internal gateway error.",
            ApiError::LoopDetected => {
                "The request came from this gateway itself: a provider points back at it."
            }
            ApiError::SharedStateUnavailable => {
                "The gateway cannot reach the store shared by all gateways and holds no money \
                 lease for this request; retry after the Retry-After delay."
            }
            ApiError::WrongGatewayPool => {
                "This API key's organization is served by a dedicated gateway pool, not by \
                 these gateways; its pool is shown in the organization's terms."
            }
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// `error.type`/`error.code` values copied from an upstream error only when they are
/// plain identifiers, so nothing free-form from the upstream reaches the client.
pub(crate) fn is_safe_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// OpenAI-shaped error body with the code's default texts.
pub(crate) fn error_body(err: ApiError, kind: Option<&str>, code: Option<&str>) -> Bytes {
    openai_error_body(
        err.message(),
        kind.unwrap_or(err.kind()),
        None,
        code.unwrap_or(err.code()),
    )
}

fn openai_error_body(message: &str, kind: &str, param: Option<&str>, code: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    });
    Bytes::from(body.to_string())
}

/// Why a request stopped before a response was relayed. Every phase of the request path
/// fails with one of these, and [`Failure::response`] is the one place that turns it into
/// the client's error response; the record takes `error` and `status` from it.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Its code goes into the record, the error counters and (by default) the body.
    pub(crate) error: ApiError,
    /// The status sent: the error's own, or an upstream error's.
    pub(crate) status: StatusCode,
    /// What few failures add, boxed so that every phase's `Result` stays small.
    detail: Option<Box<Detail>>,
}

#[derive(Debug, Default)]
struct Detail {
    /// A message from a fixed set other than the code's default (the policy rule, the
    /// guard's categories, the parameter check), and the parameter at fault.
    message: Option<&'static str>,
    param: Option<&'static str>,
    /// `error.type`/`error.code` of an upstream error, kept only when they are plain
    /// identifiers ([`is_safe_ident`]).
    upstream_kind: Option<String>,
    upstream_code: Option<String>,
    /// Refused by a rate, concurrency or budget limit: the response carries its
    /// `Retry-After` and `x-ratelimit-*` headers, and the record says `limited`.
    limited: Option<Refusal>,
}

impl Failure {
    fn with_detail(error: ApiError, status: StatusCode, detail: Detail) -> Self {
        Failure {
            error,
            status,
            detail: Some(Box::new(detail)),
        }
    }

    /// The error with a message other than the code's default.
    pub(crate) fn with_message(
        error: ApiError,
        message: &'static str,
        param: Option<&'static str>,
    ) -> Self {
        let detail = Detail {
            message: Some(message),
            param,
            ..Detail::default()
        };
        Failure::with_detail(error, error.status(), detail)
    }

    /// A key of an org these gateways do not serve: the message says which kind of
    /// gateways do (fixed texts; never the other org's pool or id).
    pub(crate) fn wrong_pool(shared: bool) -> Self {
        if shared {
            Failure::with_message(
                ApiError::WrongGatewayPool,
                "This API key's organization is served by the shared gateways, not by this \
                 dedicated pool.",
                None,
            )
        } else {
            Failure::from(ApiError::WrongGatewayPool)
        }
    }

    /// The upstream answered with an error status; only the status and the plain
    /// identifiers of its error body reach the client.
    pub(crate) fn upstream(status: StatusCode, kind: Option<String>, code: Option<String>) -> Self {
        let detail = Detail {
            upstream_kind: kind,
            upstream_code: code,
            ..Detail::default()
        };
        Failure::with_detail(ApiError::UpstreamError, status, detail)
    }

    /// Refused by a rate, concurrency or budget limit.
    pub(crate) fn limited(&self) -> bool {
        self.detail
            .as_ref()
            .is_some_and(|d| d.limited.as_ref().is_some_and(Refusal::is_limited))
    }

    /// The error response in the client's protocol: Anthropic's shape on `/v1/messages`,
    /// OpenAI's elsewhere. Every text is the gateway's own.
    pub(crate) fn response<B: From<Bytes>>(&self, anthropic: bool) -> Response<B> {
        let err = self.error;
        let detail = self.detail.as_deref();
        let message = detail.and_then(|d| d.message);
        let body = if anthropic {
            crate::protocol::anthropic::error_body(self.status, err, message)
        } else {
            openai_error_body(
                message.unwrap_or(err.message()),
                detail
                    .and_then(|d| d.upstream_kind.as_deref())
                    .unwrap_or(err.kind()),
                detail.and_then(|d| d.param),
                detail
                    .and_then(|d| d.upstream_code.as_deref())
                    .unwrap_or(err.code()),
            )
        };
        let mut resp = json_response(self.status, body);
        if let Some(refusal) = detail.and_then(|d| d.limited.as_ref()) {
            refusal.apply(resp.headers_mut());
        }
        resp
    }
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Failure {
            error,
            status: error.status(),
            detail: None,
        }
    }
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        let error = refusal.error;
        if !refusal.is_limited() && !refusal.has_retry_after() {
            return Failure::from(error);
        }
        let detail = Detail {
            message: refusal.message,
            limited: Some(refusal),
            ..Detail::default()
        };
        Failure::with_detail(error, error.status(), detail)
    }
}

impl From<Invalid> for Failure {
    fn from(invalid: Invalid) -> Self {
        Failure::with_message(
            ApiError::InvalidRequest,
            invalid.message,
            Some(invalid.param),
        )
    }
}

impl From<Denial> for Failure {
    fn from(denial: Denial) -> Self {
        Failure::with_message(ApiError::PolicyDenied, denial.message(), None)
    }
}

/// The SSE event sent when a stream ends abnormally after its 200 was already sent.
pub(crate) fn error_event(err: ApiError) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&error_body(err, None, None));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

pub(crate) fn json_response<B: From<Bytes>>(status: StatusCode, body: Bytes) -> Response<B> {
    let mut resp = Response::new(B::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
