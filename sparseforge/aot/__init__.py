"""Ahead-of-time builds: spec files in, cubins plus a manifest out (no GPU needed)."""
