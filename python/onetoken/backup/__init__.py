"""Backups of the embedded default: the control DB, chDB and ticket attachments in one
encrypted file, taken while serving, and restored into an empty data dir (docs/operations.md,
"Backup and restore")."""
