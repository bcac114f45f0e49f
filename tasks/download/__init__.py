"""Stage 1, download: the raw rows exactly as published, and where they came from.

`python -m tasks.download` runs __main__.py, which runs stage.py's main() through the stage runner
(tasks/common/runner.py).
"""
