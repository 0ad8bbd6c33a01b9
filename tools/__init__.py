"""Command-line tools around the service: benchmarks and the load generator they use.

They talk to a server over HTTP (or time the engine in-process); nothing in ``service/``
imports them, so they never ship in the serving image.
"""
