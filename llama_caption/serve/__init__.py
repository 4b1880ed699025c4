"""The caption server: `python -m llama_caption serve` (server.py), its routes and page (app.py,
static/), and dynamic batching (batching.py)."""
