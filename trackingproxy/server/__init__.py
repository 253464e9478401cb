"""The client-facing leg: bytes in, HTTP/1.1 or HTTP/2 requests out to the handler, answers back."""
