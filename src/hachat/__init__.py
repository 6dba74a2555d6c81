"""hachat: a high-availability group-chat server."""

__version__ = "0.1.0"
