"""The operator channel: reads a running control process performs for the CLI.

chDB lets one process open a data path, and while `onetoken serve` runs that process is the
control process. `onetoken billing reconcile`, `audit-retention`, `calls export` and
`calls stats` first open the stores themselves; when chDB is locked they find the control
process (control_file, then ONETOKEN_CONTROL_LISTEN) and ask it over `/internal/ops/`
(onetoken.web.routes.ops), with the ops channel's bearer token (onetoken.kit.channel),
and print the same output with the same exit code either way (client).
"""

#: Where the control process serves the ops channel.
PREFIX = "/internal/ops"
