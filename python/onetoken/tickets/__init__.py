"""Work orders: tickets a customer opens, the messages customer and staff exchange, and
the attachments the customer submits (docs/tickets.md)."""
