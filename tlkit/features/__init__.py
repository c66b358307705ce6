"""The frozen part's outputs: pooled feature rows for head probes and diagnostics, and the
on-disk feature cache with `precompute-features`.

May import `tlkit.data`, `tlkit.models` and `tlkit.core`; nothing above it.
"""
