"""sessionmgr: the shared working state of multi-agent sessions."""

__version__ = "0.1.0"
