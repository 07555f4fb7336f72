"""Teacher rationales: OpenAI-compatible client, crash-safe store, generation and filtering."""
