"""HTTP concerns: controllers, authentication, problem+json errors, health and metrics."""
