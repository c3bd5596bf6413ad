"""Pattern IR: frozen-dataclass nodes (``nodes``, ``neighborhood``, ``routing``, ``scores``),
canonicalisation (``canonicalize``), the routed pattern's parts (``split``), the ``ops``
namespaces rules are written against (``ops``) and the repr parser (``patterns_parse``).

Import the modules themselves: this package imports nothing, so constructing a pattern
does not load networkx (only canonicalisation needs it)."""
