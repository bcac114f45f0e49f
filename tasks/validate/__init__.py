"""Stage 2, validate: the great-expectations suite and the token-length report; bad data stops the run
here.

`python -m tasks.validate` runs __main__.py, which runs stage.py's main() through the stage runner
(tasks/common/runner.py).

  stage.py            validate(): scan the rows (scan.py), run the suite (expectations.py), write the reports
  scan.py             one streaming pass over the raw rows: parse, features, token counts
  scan_pool.py        the same pass on more than 2 cores: its blocks in a pool of worker processes
  expectations.py     the great-expectations suite, kept as code
  lengths.py          token-length percentiles and the histogram
  validation_page.py  the report as one self-contained HTML page
  report_images.py    the README's pictures from a workspace's reports (`make report-images`)
"""
