"""One module per screen; each has ``render(ctx)``."""
