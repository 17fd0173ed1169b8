"""What the BentoML service (service.py) is made of: the served model (snapshot), the generation thread
(batcher), the stream's events, the HTTP guards (http), metrics, pages, the API document (openapi), the models
view (history), workers' bookkeeping, and the Bento's image and build (bento)."""
