"""One module per tier: `hot` (Redis), `warm` (MongoDB through Beanie)."""
