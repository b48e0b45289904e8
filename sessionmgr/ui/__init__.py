"""The session inspector: server-rendered pages under `/ui` (docs/ui.md)."""
