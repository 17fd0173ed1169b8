"""What the BentoML service (service.py) is made of: the batcher, the HTTP guards, the docs page."""
