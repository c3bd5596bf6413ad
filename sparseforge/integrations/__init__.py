"""Integrations with other libraries (imported on demand; their packages are optional)."""
