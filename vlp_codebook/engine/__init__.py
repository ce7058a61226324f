"""Runner extensions: hooks, checkpoint loading."""
