"""Where a recipe run keeps its own records. NeMo's logger moves the files at the top of the run
folder into run_<N>/ at every new job, so they live in a sub-folder and span all the jobs of a run."""
import os

RECORDS_DIR = "recipe"
METRICS_FILE = os.path.join(RECORDS_DIR, "metrics.jsonl")
SUMMARY_FILE = os.path.join(RECORDS_DIR, "summary.json")
