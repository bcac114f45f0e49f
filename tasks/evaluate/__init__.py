"""Stage 5, evaluate: base vs tuned on the same held-out rows.

`python -m tasks.evaluate` runs __main__.py, which runs stage.py's main() through the stage runner
(tasks/common/runner.py).
"""
