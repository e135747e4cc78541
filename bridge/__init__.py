"""exchange-bridge: a TLS 1.2/1.3 front end for a TLS-1.0-only Exchange 2007."""

__version__ = "0.1.0"
