"""Sign-in through an org's own identity provider (OpenID Connect): docs/sso.md."""
