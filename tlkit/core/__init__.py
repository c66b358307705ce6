"""The ground floor every other part stands on: errors and exit codes, the closed sets of flag
values, files written whole (atomic writes, `.incomplete-` folders, locks), the run directory
and its checkpoints, the one selection rule every `auto` uses, and the probability maths
(log loss, calibration).

Imports nothing of tlkit outside `tlkit.core`, and nothing heavy at import.
"""
