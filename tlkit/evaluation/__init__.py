"""What a trained run does with images: evaluation with test-time views and ensembles, reports
and figures, class activation maps, diagnose, predict and export.

May import `tlkit.features`, `tlkit.data`, `tlkit.models` and `tlkit.core`; never
`tlkit.training`, its sibling (what both need lives below them).
"""
