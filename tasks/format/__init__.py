"""Stage 3, format: canonical conversations -> Llama-2 chat text, the length policy, the train/eval split.

`python -m tasks.format` runs __main__.py, which runs stage.py's main() through the stage runner
(tasks/common/runner.py).
"""
