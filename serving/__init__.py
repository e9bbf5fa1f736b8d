"""The OpenAI-compatible server: protocol, engines, routing table and hot reload, HTTP app."""
