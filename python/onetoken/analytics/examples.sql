-- Example queries over the analytics tables, one per `-- name:` block: `-- columns:` lists
-- what it returns, `-- needs:` the tables it reads beyond call_log and security_log, and
-- the other comment lines say what it answers. docs/analytics.md shows them (`make docs`),
-- and tests/unit/test_analytics_docs.py runs each against chDB with data. They read the
-- shared database; with gateway pools, read every log database (docs/analytics.md, Pools).

-- name: cost_by_org_model_day
-- columns: day, org_id, model_served, calls, cost_nano, cost_currency
-- Cost by org, model and day over the last 30 days. `cost_nano` is the stored integer;
-- `cost_currency` is the same sum in the deployment's currency as an exact decimal: scale
-- 9 holds every nano-unit, so the division by 10^9 rounds nothing. (An alias must not be a
-- column's name when another expression reads that column: ClickHouse would read the
-- alias.) Billing itself comes from the
-- ledger (docs/metering.md); this is the per-call view of it.
SELECT
    toDate(ts) AS day,
    org_id,
    model_served,
    count() AS calls,
    sum(cost) AS cost_nano,
    toDecimal128(sum(cost), 9) / 1000000000 AS cost_currency
FROM onetoken.call_log FINAL
WHERE ts >= now() - INTERVAL 30 DAY
GROUP BY day, org_id, model_served
ORDER BY day, cost_nano DESC;

-- name: latency_by_provider_model
-- columns: provider, model_served, calls, latency_ms_p50_p95_p99, streamed_calls, ttft_ms_p50_p95_p99
-- p50, p95 and p99 latency, and time to first token of streamed calls, by provider and
-- served model over the last day, in milliseconds (the columns hold microseconds).
-- Calls never forwarded (empty provider) are left out.
SELECT
    provider,
    model_served,
    count() AS calls,
    quantiles(0.5, 0.95, 0.99)(latency_us / 1000) AS latency_ms_p50_p95_p99,
    countIf(streamed = 1) AS streamed_calls,
    quantilesIf(0.5, 0.95, 0.99)(ttfb_us / 1000, streamed = 1) AS ttft_ms_p50_p95_p99
FROM onetoken.call_log FINAL
WHERE ts >= now() - INTERVAL 1 DAY AND provider != ''
GROUP BY provider, model_served
ORDER BY calls DESC;

-- name: error_rates_by_code
-- columns: error_code, status, calls, percent_of_calls
-- Errors by code over the last day, and each code's share of all calls in percent. A
-- failed call has an error code; its status is 400 or more, except a stream that broke
-- after its 200 went out (499: the client went away first).
SELECT
    error_code,
    status,
    count() AS calls,
    round(100 * count() / (
        SELECT count() FROM onetoken.call_log FINAL WHERE ts >= now() - INTERVAL 1 DAY
    ), 3) AS percent_of_calls
FROM onetoken.call_log FINAL
WHERE ts >= now() - INTERVAL 1 DAY AND error_code != ''
GROUP BY error_code, status
ORDER BY calls DESC;

-- name: tokens_by_key
-- columns: org_id, key_id, calls, prompt_tokens, cached_tokens, completion_tokens, estimated_calls
-- Tokens by API key over the last 7 days (prompt tokens include the cached ones).
SELECT
    org_id,
    key_id,
    count() AS calls,
    sum(prompt_tokens) AS prompt_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(completion_tokens) AS completion_tokens,
    countIf(usage_source = 'estimated') AS estimated_calls
FROM onetoken.call_log FINAL
WHERE ts >= now() - INTERVAL 7 DAY AND key_id != ''
GROUP BY org_id, key_id
ORDER BY prompt_tokens + completion_tokens DESC
LIMIT 50;

-- name: top_callers
-- columns: org_id, account_id, calls, keys, client_addresses, errors, cost_nano
-- The accounts that made the most calls in the last day, with their keys, client
-- addresses, errors and spend.
SELECT
    org_id,
    account_id,
    count() AS calls,
    uniqExact(key_id) AS keys,
    uniqExact(source_ip) AS client_addresses,
    countIf(error_code != '') AS errors,
    sum(cost) AS cost_nano
FROM onetoken.call_log FINAL
WHERE ts >= now() - INTERVAL 1 DAY AND account_id != ''
GROUP BY org_id, account_id
ORDER BY calls DESC
LIMIT 20;

-- name: rate_limit_outcomes
-- columns: hour, org_id, error_code, limited_calls
-- Refused by a limit, per hour, org and limit over the last day: `rate_limit` is `limited`
-- when a rate, concurrency or budget limit refused the call, and `error_code` says which.
SELECT
    toStartOfHour(ts) AS hour,
    org_id,
    error_code,
    count() AS limited_calls
FROM onetoken.call_log FINAL
WHERE ts >= now() - INTERVAL 1 DAY AND rate_limit = 'limited'
GROUP BY hour, org_id, error_code
ORDER BY hour, limited_calls DESC;

-- name: guard_flags_by_category
-- columns: org_id, category, flagged_calls, findings
-- What the sensitive-content guard found, per org and category over the last 7 days:
-- calls flagged and findings counted (`guard_flags` holds `category:count` pairs).
SELECT
    org_id,
    splitByChar(':', flag)[1] AS category,
    count() AS flagged_calls,
    sum(toUInt64(splitByChar(':', flag)[2])) AS findings
FROM onetoken.call_log FINAL
ARRAY JOIN splitByChar(',', guard_flags) AS flag
WHERE ts >= now() - INTERVAL 7 DAY AND guard_flags != ''
GROUP BY org_id, category
ORDER BY findings DESC;

-- name: security_events_by_kind
-- columns: kind, severity, events, actors, last_seen
-- Security events by kind and severity over the last 7 days.
SELECT
    kind,
    severity,
    count() AS events,
    uniqExact(actor_id) AS actors,
    max(ts) AS last_seen
FROM onetoken.security_log FINAL
WHERE ts >= now() - INTERVAL 7 DAY
GROUP BY kind, severity
ORDER BY events DESC;

-- name: calls_in_every_log_database
-- columns: database, rows, calls
-- Calls and rows per log database, the shared one and each pool's: merge() reads them as
-- one table and `_database` says where a row is. More rows than calls means copies
-- that ClickHouse has not yet collapsed (read with FINAL or uniqExact(request_id)).
SELECT
    _database AS database,
    count() AS rows,
    uniqExact(request_id) AS calls
FROM merge(REGEXP('^onetoken(_[a-z0-9_]{1,40})?$'), '^call_log$')
WHERE ts >= now() - INTERVAL 1 DAY
GROUP BY database
ORDER BY database;

-- name: cost_by_org_name_and_model
-- columns: org, model, calls, cost_currency
-- needs: onetoken.dim_orgs
-- Cost by org name and model over the last 30 days, names from the dimension table (a
-- deleted org keeps its name there); an org it does not know yet shows its id.
SELECT
    if(o.name = '', c.org_id, o.name) AS org,
    c.model_served AS model,
    count() AS calls,
    toDecimal128(sum(c.cost), 9) / 1000000000 AS cost_currency
FROM onetoken.call_log AS c FINAL
LEFT JOIN (SELECT org_id, name FROM onetoken.dim_orgs FINAL) AS o
    ON o.org_id = c.org_id
WHERE c.ts >= now() - INTERVAL 30 DAY
GROUP BY org, model
ORDER BY cost_currency DESC;

-- name: latency_by_provider_name
-- columns: provider, region, calls, latency_ms_p99
-- needs: onetoken.dim_providers
-- p99 latency by provider name and region over the last day (ids when the name is not
-- known yet).
SELECT
    if(p.name = '', c.provider, p.name) AS provider,
    p.region AS region,
    count() AS calls,
    quantile(0.99)(c.latency_us / 1000) AS latency_ms_p99
FROM onetoken.call_log AS c FINAL
LEFT JOIN (SELECT provider_id, name, region FROM onetoken.dim_providers FINAL) AS p
    ON p.provider_id = c.provider
WHERE c.ts >= now() - INTERVAL 1 DAY AND c.provider != ''
GROUP BY provider, region
ORDER BY calls DESC;

-- name: tokens_by_key_display_id
-- columns: org_id, key, key_name, prompt_tokens, completion_tokens
-- needs: onetoken.dim_keys
-- Tokens by key as its holders see it (display id and name) over the last 7 days.
SELECT
    c.org_id AS org_id,
    if(k.display_id = '', c.key_id, k.display_id) AS key,
    k.name AS key_name,
    sum(c.prompt_tokens) AS prompt_tokens,
    sum(c.completion_tokens) AS completion_tokens
FROM onetoken.call_log AS c FINAL
LEFT JOIN (SELECT key_id, display_id, name FROM onetoken.dim_keys FINAL) AS k
    ON k.key_id = c.key_id
WHERE c.ts >= now() - INTERVAL 7 DAY AND c.key_id != ''
GROUP BY org_id, key, key_name
ORDER BY prompt_tokens + completion_tokens DESC
LIMIT 50;

-- name: cost_by_application
-- columns: org_id, application, calls, cost_nano
-- needs: onetoken.dim_applications
-- Calls and cost by application over the last 30 days; calls of keys in no application
-- are the empty application. A key moved to another application counts for the one it
-- was in when each call was made.
SELECT
    c.org_id AS org_id,
    if(c.application_id = '', '', if(a.name = '', c.application_id, a.name)) AS application,
    count() AS calls,
    sum(c.cost) AS cost_nano
FROM onetoken.call_log AS c FINAL
LEFT JOIN (SELECT application_id, name FROM onetoken.dim_applications FINAL) AS a
    ON a.application_id = c.application_id
WHERE c.ts >= now() - INTERVAL 30 DAY
GROUP BY org_id, application
ORDER BY cost_nano DESC;

-- name: calls_per_minute_from_the_rollup
-- columns: minute, model_served, calls, errors, tokens, cost_nano, latency_us_p50_p95_p99
-- needs: onetoken.call_stats_1m
-- Calls, errors, tokens, cost and latency quantiles per minute and model over the last
-- hour from the per-minute rollup, which stays fast at billions of rows. Dashboards read
-- it; exact money comes from call_log FINAL or the ledger (docs/analytics.md, Rollup).
SELECT
    s.minute AS minute,
    s.model_served AS model_served,
    sum(s.calls) AS calls,
    sumIf(s.calls, s.error_code != '') AS errors,
    sum(s.prompt_tokens) + sum(s.completion_tokens) AS tokens,
    sum(s.cost) AS cost_nano,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(s.latency_us_q) AS latency_us_p50_p95_p99
FROM onetoken.call_stats_1m AS s
WHERE s.minute >= now() - INTERVAL 1 HOUR
GROUP BY minute, model_served
ORDER BY minute, model_served;
