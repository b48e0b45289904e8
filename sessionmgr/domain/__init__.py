"""Pure models, rules and errors: imports nothing from the rest of sessionmgr."""
