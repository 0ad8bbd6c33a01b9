"""HTTP routes, one module per concern; ``images.py`` holds the path they share."""
