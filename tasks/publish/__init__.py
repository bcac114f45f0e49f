"""Stage 6, publish: the release folder, its lineage record, provenance and signature; and the audit that checks them.

`python -m tasks.publish` runs __main__.py, which runs stage.py's main() through the stage runner
(tasks/common/runner.py).

  stage.py       publish(): gate on evaluation, write the release
  stage_code.py  the code each stage runs (dvc.yaml's code deps) and the code record of a release
  provenance.py  the in-toto/SLSA provenance statement
  signing.py     the OpenSSF model signature and its key
  audit.py       `guanaco-audit`: checks a release's record against the artifacts
"""
