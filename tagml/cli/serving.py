"""`tagml serve` (the tag API under uvicorn) and `tagml api-key create|list|revoke`."""
