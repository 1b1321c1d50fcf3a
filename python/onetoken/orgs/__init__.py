"""Organizations, accounts and admin sessions."""
