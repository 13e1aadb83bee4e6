"""Placeholder."""
import json, os
def write_report(root, results, timings):
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write(json.dumps(results)[:1000])
