"""Security and risk: the security log writer, the permission matrix, login protection,
second factors and the admin audit trail."""
