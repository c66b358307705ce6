"""`finetune` and what serves it: the settings, the head probe, the fine-tune optimizer, the
freeze search, lr-find and the input benchmark.

May import `tlkit.features`, `tlkit.data`, `tlkit.models` and `tlkit.core`; never
`tlkit.evaluation`, its sibling (what both need lives below them).
"""
