"""HTTP, by audience: admin (tenant API key), member (member token), webhooks (signed)."""
