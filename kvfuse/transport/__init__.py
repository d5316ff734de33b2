"""What both sides of a kvfuse connection share: wire formats, framing, limits, CRCs."""
